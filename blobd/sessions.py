"""Resumable upload sessions, shared by the native ``/uploads`` API and tus.

A session is created with its declared size checked against the owner's
limits and *reserved* in the owner's quota (so that many sessions together
can never overshoot it), and with its data file preallocated. Bytes arrive
through :mod:`blobd.sessionwrite`. :func:`commit_session` hashes the whole
file in a thread and hands a hard link of it to the one commit pipeline,
:func:`blobd.ingest.commit_file`, whose transaction also releases the
reservation and marks the session committed. A failed commit leaves the
session as it was, so the client may try again.

Monthly upload quota: bytes are charged as they are *received*, once (a
repeated chunk is free), so the commit itself charges nothing.

Expiry slides: every chunk received pushes ``expires_at`` to now + TTL, so a
slow upload over a bad network lives as long as it makes progress.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import aiosqlite

from . import files, index, index_sessions, ingest, periodic, reserve, sessionfiles
from .address import Address, parse_address
from .errors import BlobdError
from .index_sessions import NATIVE, TUS, Session
from .store import Store, Tx, shielded

log = logging.getLogger(__name__)

__all__ = ["NATIVE", "TUS", "Session", "NewSession", "create_session", "find_session",
           "commit_session", "abort_session", "sweep_sessions", "run_session_sweeper"]

MIB = 1 << 20
MAX_CHUNK_SIZE = 64 * MIB
# As S3's multipart uploads: every chunk is an entry in a session's status
# (GET /uploads lists them for every open session), so their number is
# bounded well below what a client with a tiny chunk size could ask for.
MAX_CHUNKS = 10_000
# A file in uploads/ without a row is left alone this long: a concatenated
# tus upload's file is written just before its row is inserted.
STRAY_GRACE_SECONDS = 600.0
# On a refusal because another request is still at work on the same part
# of an upload (a chunk's range, the commit): a retry will succeed once it
# is done, which an idle body ends within [uploads] idle_timeout_seconds.
BUSY = {"Retry-After": "1"}
# How long a request waits for one it asked to let go of an upload (see
# take_over).
KNOCK_WAIT = 3.0
T = TypeVar("T")


@dataclass(frozen=True)
class NewSession:
    owner: str
    protocol: str
    size: int | None
    chunk_size: int = 0
    expected: Address | None = None
    content_type: str | None = None
    ref: str | None = None
    metadata: str | None = None
    concat: str | None = None


async def take_over(path: os.PathLike, slot: int,
                    try_lock: Callable[[], T | None]) -> T | None:
    """``try_lock()``; if another request holds what it locks, knock on
    ``slot`` and try again for up to KNOCK_WAIT seconds: a request receiving
    a body lets go (keeping what it received where the protocol allows), a
    completion does not (it ends soon enough). None if it never gave way."""
    got = await asyncio.to_thread(try_lock)
    if got is not None:
        return got
    knock = await asyncio.to_thread(sessionfiles.knock, path, slot)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + KNOCK_WAIT
        while got is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
            got = await asyncio.to_thread(try_lock)
    finally:
        await asyncio.to_thread(sessionfiles.close, knock)
    return got


def pick_chunk_size(size: int) -> int:
    """1 MiB for files under 25 MiB, 5 MiB under 100 MiB, else 10 MiB (or,
    past ~98 GiB, the whole MiBs that keep it to MAX_CHUNKS chunks)."""
    if size < 25 * MIB:
        return MIB
    if size < 100 * MIB:
        return 5 * MIB
    return max(10 * MIB, -(-size // (MAX_CHUNKS * MIB)) * MIB)


def check_chunk_size(size: int, chunk_size: int) -> None:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise BlobdError("bad_request",
                         f"chunk_size: expected 1 to {MAX_CHUNK_SIZE} bytes")
    if -(-size // chunk_size) > MAX_CHUNKS:
        raise BlobdError("bad_request", f"chunk_size: {size} bytes would make more than"
                         f" {MAX_CHUNKS} chunks; choose a larger one")


def new_session_id() -> str:
    return secrets.token_hex(16)


def expiry(store: Store, now: float) -> float:
    return now + store.config.uploads.session_ttl_seconds


async def precheck(store: Store, owner: str, size: int | None) -> None:
    """Refuse a declared size before any file or row exists: 413 over the
    blob size limit, 507 over the monthly upload quota or the free disk."""
    default = store.config.quota_for(owner)
    limits = await index.limits_for(store.db.reader, owner, default)
    if size is None:
        # Its bytes are reserved before each PATCH reads them (sessionroom.Ahead).
        await store.check_free_space(0)
        return
    index.check_blob_size(size, limits, store.config.limits.max_blob_size)
    used = await index.usage(store.db.reader, owner)
    if used["monthly_upload_bytes"] + size > limits.max_monthly_upload_bytes:
        raise BlobdError("quota_exceeded", "quota max_monthly_upload_bytes"
                         f" ({limits.max_monthly_upload_bytes} bytes) would be exceeded")
    await store.check_free_space(size)


async def create_session(store: Store, spec: NewSession) -> Session:
    await precheck(store, spec.owner, spec.size)
    now = time.time()
    session = Session(
        id=new_session_id(), owner=spec.owner, protocol=spec.protocol, size=spec.size,
        chunk_size=spec.chunk_size, expected_hash=str(spec.expected) if spec.expected
        else None, content_type=spec.content_type, ref=spec.ref, metadata=spec.metadata,
        concat=spec.concat, upload_offset=0, reserved_bytes=spec.size or 0,
        created_at=now, expires_at=expiry(store, now))
    try:
        await shielded(_create(store, session))
    except asyncio.CancelledError:
        # Cut off (a shutdown) once the session was made, or while it was:
        # its client will never learn the id, so nothing may stay reserved.
        await shielded(abort_session(store, session))
        raise
    return session


async def create_for_stored(store: Store, spec: NewSession,
                            digest: str) -> tuple[Session, ingest.Stored] | None:
    """A session for content the server has already (``digest``, of the
    declared size): made committed, in the transaction that gives the
    caller its reference, so that a client finds every chunk received and
    its completion answers like a PUT, with nothing to send. None when the
    blob is not there after all: the caller makes an ordinary session."""
    assert spec.size is not None
    check_sessions_on(store)
    now = time.time()
    session = Session(
        id=new_session_id(), owner=spec.owner, protocol=spec.protocol, size=spec.size,
        chunk_size=spec.chunk_size, expected_hash=str(spec.expected) if spec.expected
        else None, content_type=spec.content_type, ref=spec.ref, metadata=spec.metadata,
        concat=spec.concat, upload_offset=spec.size, reserved_bytes=0,
        created_at=now, expires_at=expiry(store, now), result_hash=digest)

    async def record(tx: Tx, blob_hash: str) -> None:
        # Committed sessions are kept only as many as open ones may be.
        limit = store.config.uploads.max_sessions_per_owner
        await index_sessions.forget_finished(tx.conn, spec.owner, keep=limit - 1)
        await index_sessions.insert(tx.conn, session)

    stored = await ingest.add_existing(store, digest, spec.owner, spec.ref, spec.size,
                                       in_tx=record)
    return None if stored is None else (session, stored)


async def _create(store: Store, session: Session) -> None:
    """Reserve the session's bytes (its row), then allocate its file, so
    no file is ever made for bytes its owner has no room for; a failed
    allocation (a full disk) takes the row back. Start-up recovery removes
    a row whose file a crash kept from being made."""
    await _insert(store, session)
    path = store.layout.upload_path(session.id)
    try:
        await asyncio.to_thread(sessionfiles.create, path, session.size,
                                store.config.storage.fsync)
    except BaseException:
        await _delete(store, session.id)
        raise
    # Not listed until its file exists (see GET /uploads), but a DELETE
    # by id could have come meanwhile: then the file must not stay.
    if await index_sessions.get(store.db.reader, session.id, session.owner, 0.0) is None:
        await asyncio.to_thread(files.remove_quietly, path)
        raise BlobdError("not_found", f"upload session {session.id} was deleted"
                         " while it was being made")


async def _delete(store: Store, session_id: str) -> None:
    async def run() -> None:
        async with store.write() as tx:
            await index_sessions.delete(tx.conn, session_id)
    await reserve.freeing(store, run)


async def _insert(store: Store, session: Session) -> None:
    async with store.write() as tx:
        await check_reservation(store, tx, session.owner, session.size)
        await check_ref_room(store, tx, session)
        check_sessions_on(store)
        limit = store.config.uploads.max_sessions_per_owner
        if await index_sessions.count_open(tx.conn, session.owner, time.time()) >= limit:
            raise BlobdError("quota_exceeded", f"you have {limit} open upload sessions"
                             " already; finish or delete one first")
        # The one made here may finish too: then it is the limit-th.
        await index_sessions.forget_finished(tx.conn, session.owner, keep=limit - 1)
        await index_sessions.insert(tx.conn, session)


def check_sessions_on(store: Store) -> None:
    """``[uploads] max_sessions_per_owner = 0``, which older versions took,
    means no upload session for anyone: said as such, not as "you have 0
    open sessions already", and before a session is kept even for content
    the server has (whose row would otherwise never be forgotten)."""
    if store.config.uploads.max_sessions_per_owner == 0:
        raise BlobdError("quota_exceeded", "upload sessions are turned off on this server"
                         " ([uploads] max_sessions_per_owner = 0); send the blob in one PUT")


async def check_reservation(store: Store, tx: Tx, owner: str, size: int | None,
                            held: int = 0, *, new: bool = True) -> None:
    """The authoritative check, in the transaction that will reserve ``size``
    (of which the upload holds ``held`` already) and, for a ``new`` session,
    a blob: used + reserved + the rest must fit the owner's limits."""
    row = await index.owner_row(tx.conn, owner)
    limits = index.effective_limits(row, store.config.quota_for(owner))
    if size is not None:
        index.check_blob_size(size, limits, store.config.limits.max_blob_size)
    index.check_room(row, limits, 0 if size is None else size - held, 1 if new else 0)


async def check_ref_room(store: Store, tx: Tx, session: Session) -> None:
    """Refuse a session whose completion would add a reference name while
    the owner has no room for one, before any byte is sent. Nothing is
    reserved (a name may exist by then, or another go): the completion's
    transaction decides. A session that names no ref and no known hash
    gets the name of a hash not known yet, counted as a new one. A tus
    partial upload never becomes a blob of its own: no name."""
    if session.is_partial:
        return
    name = session.ref
    if name is None and session.expected_hash is not None:
        expected = parse_address(session.expected_hash)
        name = (expected.digest if expected.is_blake3
                else await index.hash_for_sha256(tx.conn, expected.digest))
    if name is not None and await index.has_ref(tx.conn, session.owner, name):
        return
    row = await index.owner_row(tx.conn, session.owner)
    index.check_ref_room(row, index.effective_limits(row,
                                                     store.config.quota_for(session.owner)))


async def find_session(store: Store, session_id: str, owner: str,
                       protocol: str) -> Session:
    """The owner's live session of this protocol; 404 for anything else,
    including another owner's session and an id that is not one of ours."""
    session = None
    if _is_session_id(session_id):
        session = await index_sessions.get(store.db.reader, session_id, owner, time.time())
    if session is None or session.protocol != protocol:
        raise BlobdError("not_found", f"no upload session {session_id}")
    return session


def _is_session_id(text: str) -> bool:
    return 0 < len(text) <= 64 and all(c in "0123456789abcdefghijklmnopqrstuvwxyz"
                                       for c in text)


async def reload(store: Store, session: Session,
                 conn: aiosqlite.Connection | None = None) -> Session:
    """The session's row as it is now (after taking its file lock, or inside
    a transaction); 404 once it is gone or expired."""
    current = await index_sessions.get(conn or store.db.reader, session.id,
                                       session.owner, time.time())
    if current is None:
        raise BlobdError("not_found", f"no upload session {session.id}")
    return current


async def missing_chunks(store: Store, session: Session) -> list[int]:
    """The indexes of the chunks of a native session not received yet."""
    if session.committed:
        return []
    have = set(await index_sessions.received(store.db.reader, session.id))
    return [i for i in range(session.chunks) if i not in have]


async def _check_complete(store: Store, session: Session) -> None:
    if session.protocol == TUS:
        if session.size is None or session.upload_offset < session.size:
            raise BlobdError("conflict", f"only {session.upload_offset} bytes of this"
                             " upload have arrived")
        return
    missing = await missing_chunks(store, session)
    if missing:
        raise BlobdError("conflict", f"{len(missing)} of {session.chunks} chunks are"
                         " missing", extra={"missing": missing})


async def commit_session(store: Store, session: Session) -> ingest.Stored:
    """Commit a session whose bytes have all arrived; idempotent."""
    path = store.layout.upload_path(session.id)
    try:
        fd = await asyncio.to_thread(sessionfiles.open_locked, path, True)
    except FileNotFoundError:
        return await _committed_already(store, await reload(store, session))
    if fd is None:
        raise BlobdError("locked" if session.protocol == TUS else "conflict",
                         "parts of this upload are still being received;"
                         " try again when they are done", headers=BUSY)
    committed = False
    try:
        current = await reload(store, session)
        if current.committed:
            # Its file is left only by a process killed right after the
            # commit: a second name of the blob's bytes, which must go
            # whatever the answer (the blob may be deleted since).
            committed = True
            return await _committed_already(store, current)
        await _check_complete(store, current)
        stored = await _commit(store, current, path)
    finally:
        await asyncio.to_thread(sessionfiles.close, fd)
        if committed:
            await asyncio.to_thread(files.remove_quietly, path)
    await asyncio.to_thread(files.remove_quietly, path)
    return stored


async def _commit(store: Store, session: Session, path: os.PathLike) -> ingest.Stored:
    # A deferred-length file whose length was set by a transaction that a
    # crash kept from cutting it (see sessionwrite._fix_length) may still
    # hold bytes of a refused PATCH past its end.
    await asyncio.to_thread(sessionfiles.cut_to, path, session.size)
    digests = await asyncio.to_thread(files.hash_file, path)
    if digests.size != session.size:
        # Never a blob of other bytes than were received and recorded.
        raise BlobdError("internal", f"upload {session.id}: its file holds {digests.size}"
                         f" bytes, not the {session.size} received")
    # The pipeline consumes the file it is given; give it a second name, so
    # that a failed commit (wrong hash, quota) leaves the session intact.
    link = store.layout.new_temp_path()
    await asyncio.to_thread(os.link, path, link)
    expected = parse_address(session.expected_hash) if session.expected_hash else None

    async def claim(tx: Tx, digest: str) -> None:
        if not await index_sessions.mark_committed(tx.conn, session, digest,
                                                   expiry(store, time.time())):
            raise BlobdError("conflict", f"upload session {session.id} is gone")

    return await ingest.commit_file(
        store, ingest.Received(link, digests), owner=session.owner, ref=session.ref,
        content_type=session.content_type, expected=expected, uploaded=False,
        in_tx=claim)


async def _committed_already(store: Store, session: Session) -> ingest.Stored:
    """A repeated completion answers like the first (now as a known blob)."""
    if session.result_hash is None:
        raise BlobdError("not_found", f"upload session {session.id} has no data file")
    stored = await ingest.add_existing(store, session.result_hash, session.owner,
                                       session.ref)
    if stored is None:
        raise BlobdError("conflict", "this upload was committed, but its blob has"
                         " been deleted since")
    return stored


async def abort_session(store: Store, session: Session) -> None:
    """Remove a session and its file. Requests receiving its bytes are asked
    to let go; while one that does not (a completion) is at work on it:
    409 (tus: 423)."""
    path = store.layout.upload_path(session.id)
    try:
        fd = await take_over(path, sessionfiles.WHOLE,
                             lambda: sessionfiles.open_locked(path, True))
    except FileNotFoundError:
        fd = -1   # committed, or lost in a crash: only the row is left
    if fd is None:
        raise BlobdError("locked" if session.protocol == TUS else "conflict",
                         "this upload is being received or completed; try again when"
                         " that is done", headers=BUSY)
    try:
        await shielded(_delete(store, session.id))
        await asyncio.to_thread(files.remove_quietly, path)
    finally:
        if fd >= 0:
            await asyncio.to_thread(sessionfiles.close, fd)


async def sweep_sessions(store: Store, now: float | None = None) -> int:
    """Remove expired sessions with their files, and files no session owns
    (an abort or a commit cut short by a crash); returns how many.

    An expired session whose file a request holds locked is receiving bytes
    (or being committed) right now: it is alive, and left alone."""
    moment = time.time() if now is None else now
    removed, after = 0, ""
    while ids := await index_sessions.expired_ids(store.db.reader, moment, after):
        after = ids[-1]
        locked = await asyncio.to_thread(_lock_idle, store, ids)
        try:
            async def drop() -> list[str]:
                async with store.write() as tx:
                    return [i for i in locked
                            if await index_sessions.delete(tx.conn, i, expired_by=moment)]
            gone = await reserve.freeing(store, drop)
            await asyncio.to_thread(files.remove_quietly,
                                    *(store.layout.upload_path(i) for i in gone))
        finally:
            await asyncio.to_thread(sessionfiles.close, *(fd for fd in locked.values()
                                                          if fd is not None))
        removed += len(gone)
    keep = await index_sessions.open_ids(store.db.reader)
    strays = await asyncio.to_thread(sessionfiles.stray_files, store.layout, keep,
                                     moment - STRAY_GRACE_SECONDS)
    await asyncio.to_thread(files.remove_quietly, *strays)
    return removed + len(strays) + await _sweep_fileless(store, moment - STRAY_GRACE_SECONDS)


async def _sweep_fileless(store: Store, created_before: float) -> int:
    """Sessions whose file was never made: with ``workers = N``, a worker
    killed between a session's row and its file leaves one that its
    siblings serve on, unseen (not listed without its file) and holding its
    owner's reservation until it expires. A session's file is made the
    moment its row has committed, so one still missing long after is
    never coming."""
    old = await index_sessions.open_ids(store.db.reader, created_before)
    lost = await asyncio.to_thread(_without_file, store, old)
    if not lost:
        return 0
    async with store.write() as tx:
        lost = await asyncio.to_thread(_without_file, store, lost)
        gone = [i for i in lost if await index_sessions.delete(tx.conn, i) is not None]
    if gone:
        log.warning("removed %d upload sessions whose file was never made (a worker"
                    " killed while making them)", len(gone))
    return len(gone)


def _without_file(store: Store, ids: Iterable[str]) -> list[str]:
    return [i for i in sorted(ids) if not store.layout.upload_path(i).exists()]


def _lock_idle(store: Store, ids: list[str]) -> dict[str, int | None]:
    """The sessions among ``ids`` no request is at work on, each with its
    file locked for the caller (None: it has no file); blocking."""
    locked: dict[str, int | None] = {}
    try:
        for session_id in ids:
            try:
                fd = sessionfiles.open_locked(store.layout.upload_path(session_id), True)
            except FileNotFoundError:
                locked[session_id] = None
                continue
            if fd is not None:
                locked[session_id] = fd
    except BaseException:
        # (Out of file descriptors, say.) Left open, the locks would keep
        # these sessions from every request until the process ended.
        sessionfiles.close(*(fd for fd in locked.values() if fd is not None))
        raise
    return locked


async def run_session_sweeper(store: Store) -> None:
    """Background task: sweep now (whatever expired while the server was
    down), then periodically until cancelled."""
    ttl = store.config.uploads.session_ttl_seconds
    interval = max(1.0, min(60.0, ttl / 2))
    await periodic.every(interval, lambda: sweep_sessions(store),
                         "removed %d expired or abandoned upload sessions", at_start=True)
