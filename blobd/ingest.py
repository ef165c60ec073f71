"""The one commit pipeline: every blob enters the store through here.

PUT, POST, completed upload sessions and tus uploads all end in
:func:`commit_file`: a fully received file that is verified against
the address the client claimed, then, in one index transaction, recorded,
referenced for the caller (quota checked in the same transaction) and
hard-linked into its final place. A failure at any step removes the temp
file and leaves the index untouched.

What the blob is (content type, audio facts) is decided by
:mod:`blobd.describe` before the transaction, so the mutagen probe never
runs while the index's write lock is held; ``[audio] require_audio`` refuses
a blob there, before anything is stored.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from . import describe, files, index, reaper, sniff, sockbody
from .address import Address
from .bodywriter import BodyWriter
from .errors import BlobdError, BodyStalled
from .files import Digests
from .index import BlobRecord
from .layout import parse_tmp_name
from .sockbody import SocketBody
from .store import Store, Tx, shielded

# Bodies are handed to a writer thread in pieces of this size: large enough
# that the hop to the thread is noise, small enough to keep memory flat.
WRITE_CHUNK = 512 << 10


@dataclass(frozen=True)
class Received:
    path: Path
    digests: Digests
    # False when the bytes cannot probe as audio (sniff.could_be_audio),
    # known for bodies received whole in memory; True means "probe it".
    may_be_audio: bool = True
    # False when the file's data is not durable yet (a small body, written
    # without its own fsync): the commit makes it so, with the batch.
    synced: bool = True
    # Directories that gained an entry when the blob's shard directories
    # were made ahead of the commit; made durable with the blob.
    new_dirs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Stored:
    blob: BlobRecord
    created: bool
    ref: str

    def to_json(self) -> dict[str, Any]:
        return {"hash": self.blob.hash, "sha256": self.blob.sha256,
                "size": self.blob.size, "content_type": self.blob.content_type,
                "created": self.created, "ref": self.ref}


async def receive(store: Store, chunks: AsyncIterator[bytes], *, limit: int,
                  declared: int | None = None) -> Received:
    """Stream a body to a temp file, hashing it; enforce ``limit`` as it comes.

    A body that ends within its first ``WRITE_CHUNK`` bytes (most uploads
    on a busy server) is hashed and written in one thread call, straight
    under its digest's temp name, so the commit need not rename it. A longer
    one streams: the next network read overlaps with the previous chunk's
    write and hash in a thread. Either way ``[storage] min_free_bytes`` is
    checked as the bytes are written. On any failure the temp file is gone.
    """
    chunks = chunks.__aiter__()
    total, parts = 0, Parts()
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise BlobdError("too_large", f"body is over the {limit}-byte limit")
        if parts.add(chunk) >= WRITE_CHUNK:
            return await _stream(store, chunks, parts, limit=limit, declared=declared)
    _check_length(total, declared)
    return await asyncio.to_thread(_write_small, store, parts)


class Parts(list[bytes]):
    """Body pieces as they came off the socket, handed to a thread as they
    are: the event loop never copies them into one buffer."""

    size = 0

    def add(self, chunk: bytes) -> int:
        self.append(chunk)
        self.size += len(chunk)
        return self.size


def _write_small(store: Store, parts: Parts) -> Received:
    store.ensure_free_space(parts.size)
    data = b"".join(parts)
    digests = files.digests_of(data)
    path = store.layout.new_temp_path(digests.blake3)
    # No fsync here: should the blob be new, its commit makes the file
    # durable together with the rest of its batch (one syncfs for many);
    # should it be a duplicate, the file is thrown away unsynced.
    files.write_new_file(path, data, fsync=False, direct=store.config.storage.fsync)
    # Here rather than in the commit: a fresh store makes a shard directory
    # for most uploads, and the commit runs under the index's write lock.
    try:
        new_dirs = files.make_shard_dirs(store.layout.blob_path(digests.blake3))
    except BaseException:
        files.remove_quietly(path)
        raise
    return Received(path, digests, sniff.could_be_audio(data),
                    synced=not store.config.storage.fsync, new_dirs=tuple(new_dirs))


def _check_length(total: int, declared: int | None) -> None:
    if declared is not None and total != declared:
        raise BlobdError("bad_request", f"body ended after {total} of {declared} bytes")


async def _stream(store: Store, chunks: AsyncIterator[bytes], parts: Parts, *,
                  limit: int, declared: int | None) -> Received:
    """The rest of a long body, after its first ``parts``, through a BodyWriter."""
    path = store.layout.new_temp_path()
    writer = await asyncio.to_thread(BodyWriter, path,
                                     store.config.storage.min_free_bytes,
                                     store.config.storage.fsync)
    total, pending = parts.size, None
    try:
        pending = asyncio.ensure_future(asyncio.to_thread(writer.write_all, parts))
        parts = Parts()
        async for chunk in chunks:
            total += len(chunk)
            if total > limit:
                raise BlobdError("too_large", f"body is over the {limit}-byte limit")
            if parts.add(chunk) >= WRITE_CHUNK:
                await pending
                pending = asyncio.ensure_future(asyncio.to_thread(writer.write_all, parts))
                parts = Parts()
        await pending
        if parts:
            await asyncio.to_thread(writer.write_all, parts)
        _check_length(total, declared)
        digests = await asyncio.to_thread(writer.finish, store.config.storage.fsync)
    except BaseException:
        if pending is not None and not pending.done():
            await asyncio.wait([pending])
        await asyncio.to_thread(writer.discard)
        raise
    return Received(path, digests)


async def receive_socket(store: Store, body: SocketBody, *, limit: int) -> Received:
    """A declared-length body read straight off its socket (see
    :mod:`blobd.sockbody`) to a temp file, hashed. On any failure the temp
    file is gone; ``body`` is closed either way."""
    config = store.config.storage
    try:
        if body.length > limit:
            raise BlobdError("too_large", f"body is over the {limit}-byte limit")
        writer = await asyncio.to_thread(BodyWriter, store.layout.new_temp_path(),
                                         config.min_free_bytes, config.fsync, direct=True)
    except BaseException:
        body.close()
        raise
    try:
        await sockbody.receive_into(body, writer)
        digests = await asyncio.to_thread(writer.finish, config.fsync)
    except BaseException:
        await asyncio.to_thread(writer.discard)
        raise
    return Received(writer.path, digests)


async def body_chunks(content: Any, idle: float) -> AsyncIterator[bytes]:
    """A request body as the pieces aiohttp received (``readchunk``), not
    joined into one bytes object first as ``iter_any`` does when several
    are waiting; :class:`BodyStalled` after ``idle`` seconds without one."""
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk, _ = await content.readchunk()
        except TimeoutError:
            raise BodyStalled(idle) from None
        if not chunk:
            if content.at_eof():
                return
            continue  # the end of an HTTP chunk, with no data
        yield chunk


def verify(digests: Digests, expected: Address | None) -> None:
    if expected is None:
        return
    actual = digests.blake3 if expected.is_blake3 else digests.sha256
    if actual != expected.digest:
        raise BlobdError("digest_mismatch",
                         f"the body hashes to {actual}, not {expected.digest}")


# Work a caller adds to the commit transaction, given the blob's digest; it
# runs before the reference is added, and raising rolls the commit back.
InTx = Callable[[Tx, str], Awaitable[None]]
# A request's preconditions, checked against the blob as the index has it
# (None: not stored, or waiting for deletion) inside the transaction that
# would reference it; it raises to refuse, and then nothing changes.
Precondition = Callable[[BlobRecord | None], None]


async def commit_file(store: Store, received: Received, *, owner: str, ref: str | None,
                      content_type: str | None, expected: Address | None = None,
                      uploaded: bool = True, in_tx: InTx | None = None,
                      precondition: Precondition | None = None) -> Stored:
    """Verify and commit a received file for ``owner``; the file is consumed.

    ``uploaded`` counts the bytes against the owner's monthly upload quota.
    ``in_tx`` lets an upload session release its quota reservation and mark
    itself committed in the very transaction that references the blob (an
    ordinary :meth:`Store.write` transaction, not a group commit).
    ``precondition`` may refuse the commit in that transaction.
    """
    try:
        verify(received.digests, expected)
        info = await describe.describe(store, received.path, received.digests, content_type,
                                       may_be_audio=received.may_be_audio)
        describe.admit(store.config.audio, info)
    except BaseException:
        await asyncio.to_thread(files.remove_quietly, received.path)
        raise
    return await shielded(_commit(store, received, owner, ref, info, uploaded, in_tx,
                                  precondition))


async def _commit(store: Store, received: Received, owner: str, ref: str | None,
                  info: describe.Description, uploaded: bool,
                  in_tx: InTx | None, precondition: Precondition | None) -> Stored:
    digests = received.digests
    final = store.layout.blob_path(digests.blake3)
    staged = await _staged(store, received)
    unsynced = None if received.synced else staged

    async def body(tx: Tx) -> Stored:
        now = time.time()
        blob = await index.get_blob(tx.conn, digests.blake3)
        if precondition is not None:
            precondition(blob if blob is not None and blob.live else None)
        created = blob is None
        if blob is None:
            blob = _new_record(store, digests, info, now)
            await index.insert_blob(tx.conn, blob)
        if in_tx is not None:
            await in_tx(tx, blob.hash)
        stored = await _reference(store, tx, owner, ref, blob, created, now)
        if uploaded:
            await index.charge_upload(tx.conn, owner, digests.size,
                                      store.config.quota_for(owner))
        await _place(store, tx, staged, final, created, unsynced, received.new_dirs)
        return stored

    # Group commit (the commit thread) can run only bodies that await
    # nothing but the index; a caller's in_tx may await anything, so it
    # gets a transaction of its own. Both run this same body.
    return await store.commit(body, cleanup=[staged], grouped=in_tx is None)


async def _staged(store: Store, received: Received) -> Path:
    """The received file under its digest's temp name (given it now if it
    has another), so crash recovery can tell an uncommitted link from a
    committed blob."""
    digest = received.digests.blake3
    if parse_tmp_name(received.path.name) == ("put", digest):
        return received.path
    staged = store.layout.new_temp_path(digest)
    try:
        await asyncio.to_thread(received.path.rename, staged)
    except BaseException:
        await asyncio.to_thread(files.remove_quietly, received.path)
        raise
    return staged


async def add_existing(store: Store, digest: str, owner: str, ref: str | None,
                       size: int | None = None, in_tx: InTx | None = None, *,
                       precondition: Precondition | None = None) -> Stored | None:
    """Reference an already stored blob without a body (Expect: 100-continue,
    upload sessions for known content); None when the blob must be uploaded,
    also when the client announced a ``size`` that is not the blob's: those
    bytes are something else, which only reading them can tell. ``in_tx``
    as for :func:`commit_file`, run only when the blob is referenced.
    ``precondition`` may refuse the reference (see :data:`Precondition`)."""
    async def body(tx: Tx) -> Stored | None:
        blob = await index.get_blob(tx.conn, digest)
        final = store.layout.blob_path(digest)
        if blob is None or (size is not None and size != blob.size):
            return None
        if not await tx.blocking(final.exists):
            return None
        if precondition is not None:
            precondition(blob if blob.live else None)
        describe.admit(store.config.audio, describe.Description.of_record(blob))
        if in_tx is not None:
            await in_tx(tx, blob.hash)
        return await _reference(store, tx, owner, ref, blob, False, time.time())
    return await shielded(store.commit(body, grouped=in_tx is None))


async def _reference(store: Store, tx: Tx, owner: str, ref: str | None,
                     blob: BlobRecord, created: bool, now: float) -> Stored:
    name = ref or blob.hash
    zeroed = await index.add_ref(tx.conn, owner, name, blob,
                                 store.config.quota_for(owner), now, new_blob=created)
    await reaper.release_zeroed(store, tx, zeroed)
    tx.count(puts=1, put_dedup_hits=0 if created else 1)
    mirror = store.config.mirror
    if created and mirror is not None:
        await tx.enqueue_mirror(blob.hash, "put", now)
    return Stored(blob, created, name)


async def _place(store: Store, tx: Tx, staged: Path, final: Path, created: bool,
                 unsynced: Path | None, new_dirs: tuple[Path, ...]) -> None:
    """Link the verified file into place (also healing a missing file of a
    known blob); the new directory entries, and the file's data when it is
    ``unsynced``, are made durable before COMMIT, and the link is undone
    should the transaction roll back."""
    def place() -> list[Path]:
        if not created and final.exists():
            return []
        return files.link_into_place(staged, final)
    to_sync = await tx.blocking(place)
    if not to_sync:
        return
    # Should COMMIT fail (a full disk), the file must not stay under a final
    # name without its row.
    tx.undo.append(functools.partial(files.unlink_if_same, final, staged))
    if store.config.storage.fsync:
        tx.sync_dirs.extend(to_sync)
        tx.sync_dirs.extend(new_dirs)
        if unsynced is not None:
            tx.sync_files.append(unsynced)


def _new_record(store: Store, digests: Digests, info: describe.Description,
                now: float) -> BlobRecord:
    mirror_state = "pending" if store.config.mirror is not None else "off"
    return BlobRecord(digests.blake3, digests.sha256, digests.size, info.content_type,
                      now, 0, None, info.audio, mirror_state)
