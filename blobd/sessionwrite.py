"""Receiving bytes into a session file: native chunks and tus PATCH bodies.

Bodies stream to their place in the preallocated file in pieces of at most
``WRITE_CHUNK`` bytes, each written (``pwrite``) and hashed in one thread
call, so memory stays flat whatever the chunk size. Bytes are durable
(``fdatasync`` when ``[storage] fsync``) before the index records them:
a chunk the server acknowledged survives a power cut.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Awaitable, Callable

from . import index, index_sessions, sessionfiles
from .errors import BlobdError, BodyStalled, BodyTakenOver
from .index_sessions import TUS, Session
from .ingest import WRITE_CHUNK
from .sessionroom import Ahead, Room, check_room
from .sessions import BUSY, check_reservation, expiry, reload, take_over
from .store import Store, Tx, shielded

FINAL_TAKES_NO_PATCH = "a final (concatenated) upload takes no PATCH"
# Sends 100 Continue to a client waiting for it (see blobd.http.middleware).
Invite = Callable[[], Awaitable[None]]


async def _no_invite() -> None:
    return None
RESUME_ADVICE = "send the rest again (the upload resumes where it stands)"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """A digest the client sent for a body: hashlib name and raw digest."""
    algorithm: str
    expected: bytes


class _Sink:
    """Writes a body at increasing offsets (or only hashes it, fd None);
    :meth:`write` runs in a thread."""

    def __init__(self, fd: int | None, start: int, checks: list[Check]) -> None:
        self.fd = fd
        self.start = start
        self.hashers = [(c, hashlib.new(c.algorithm)) for c in checks]
        self.written = 0

    def write(self, data: bytearray) -> None:
        if self.fd is not None:
            sessionfiles.write_at(self.fd, data, self.start + self.written)
        for _, hasher in self.hashers:
            hasher.update(data)
        self.written += len(data)

    def verify(self, status: int | None) -> None:
        for check, hasher in self.hashers:
            if hasher.digest() != check.expected:
                raise BlobdError("digest_mismatch", f"the body's {check.algorithm}"
                                 " does not match the digest sent with it", status=status)


def broke_off(exc: BaseException) -> bool:
    """The body stopped coming (as opposed to being refused): what arrived
    before is kept where the protocol allows it (a tus PATCH)."""
    return isinstance(exc, (BodyStalled, BodyTakenOver)) or not isinstance(exc, BlobdError)


# How often a request receiving a body looks for a knock (see
# sessionfiles.knock and sessions.take_over).
KNOCK_POLL = 0.25


class _Preemption:
    """Ends a body with BodyTakenOver once another request knocks on the
    parts this one holds: while the body is awaited (a timer looks, and
    cancels the wait) or between two writes, never during one, whose bytes
    would then land after this request had let the upload go."""

    def __init__(self, fd: int, slots: tuple[int, ...]) -> None:
        self.fd, self.slots = fd, slots
        self.taken = False
        self.looked = time.monotonic()

    def look_if_due(self) -> None:
        """Look now if the last look is KNOCK_POLL old: a body trickling in
        pieces less than that apart never lets the timer below fire."""
        now = time.monotonic()
        if now - self.looked >= KNOCK_POLL:
            self.looked = now
            if sessionfiles.knocked(self.fd, self.slots):
                raise BodyTakenOver()

    async def next_piece(self, pieces: AsyncIterator[bytes]) -> bytes:
        self.look_if_due()
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def look() -> None:
            nonlocal timer
            self.looked = time.monotonic()
            if sessionfiles.knocked(self.fd, self.slots):
                self.taken = True
                task.cancel()
            else:
                timer = loop.call_later(KNOCK_POLL, look)

        timer = loop.call_later(self.looked + KNOCK_POLL - time.monotonic(), look)
        try:
            return await anext(pieces)
        except asyncio.CancelledError:
            # Ours unless something else (a shutdown) cancelled as well.
            if self.taken and task.uncancel() == 0:
                raise BodyTakenOver() from None
            raise
        finally:
            timer.cancel()


# Called with the bytes a body has brought so far when they pass the limit
# it had: the new limit, raised before they are buffered or written, or
# the error that refuses the body.
Grow = Callable[[int], Awaitable[int]]


async def _pump(body: AsyncIterator[bytes], sink: _Sink, limit: int,
                too_long: Callable[[], BlobdError], keep_partial: bool,
                idle: float, preemption: _Preemption, grow: Grow | None = None) -> None:
    """Write ``body`` through ``sink``, at most ``limit`` bytes unless
    ``grow`` raises it (else ``too_long``). A body that stops coming ends the
    request after ``idle`` seconds: a client whose network vanished without
    a FIN would otherwise hold its chunk's range (or the tus upload's lock)
    until TCP gave up, hours later, and refuse its own retries meanwhile.
    Sooner if that client (or any other) asks for the same part again: the
    new request takes it over (``preemption``)."""
    buf = bytearray()
    pieces = body.__aiter__()
    try:
        while True:
            try:
                async with asyncio.timeout(idle):
                    piece = await preemption.next_piece(pieces)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise BodyStalled(idle, RESUME_ADVICE) from None
            if sink.written + len(buf) + len(piece) > limit:
                if grow is None:
                    raise too_long()
                limit = await grow(sink.written + len(buf) + len(piece))
            buf += piece
            if len(buf) >= WRITE_CHUNK:
                data, buf = buf, bytearray()
                await asyncio.to_thread(sink.write, data)
                preemption.look_if_due()
    except BaseException as exc:
        # The body broke off (client gone or silent, or the handler
        # cancelled with it): keep what did arrive.
        if keep_partial and buf and broke_off(exc):
            await shielded(asyncio.to_thread(sink.write, buf))
        raise
    if buf:
        await asyncio.to_thread(sink.write, buf)


async def _open(store: Store, session: Session, exclusive: bool) -> int:
    """The session file, locked; a tus upload another request holds is
    asked to let go (see take_over), a native one being completed is 409."""
    path = store.layout.upload_path(session.id)

    def try_lock() -> int | None:
        return sessionfiles.open_locked(path, exclusive)

    try:
        if exclusive:
            fd = await take_over(path, sessionfiles.WHOLE, try_lock)
        else:
            fd = await asyncio.to_thread(try_lock)
    except FileNotFoundError:
        raise BlobdError("not_found", f"no upload session {session.id}") from None
    if fd is None:
        if session.protocol == TUS:
            raise BlobdError("locked", "another request is writing to this upload")
        raise BlobdError("conflict", "this upload is being completed", headers=BUSY)
    return fd


async def _alive(store: Store, session: Session) -> Session:
    """The session as it stands, now that this request holds its file's
    lock; with less than half its time to live left, its expiry is pushed
    back first, so that bytes arriving keep it alive however long they
    take (the sweeper leaves a locked session alone meanwhile)."""
    now = time.time()
    current = await reload(store, session)
    if current.expires_at - now >= store.config.uploads.session_ttl_seconds / 2:
        return current
    async with store.write() as tx:
        alive = await index_sessions.keep_alive(tx.conn, session.id, session.owner, now,
                                                expiry(store, now))
    if alive is None:
        raise BlobdError("not_found", f"no upload session {session.id}")
    return alive


async def _locked_row(tx: Tx, session: Session) -> Session:
    """The row of a session whose file lock this request holds: it may have
    expired while the body came, but the sweeper cannot have removed it."""
    current = await index_sessions.get(tx.conn, session.id, session.owner, 0.0)
    if current is None:
        raise BlobdError("not_found", f"no upload session {session.id}")
    return current


# -- native chunks -----------------------------------------------------------

def check_chunk(session: Session, idx: int, length: int | None) -> tuple[int, int]:
    """(offset, length) of chunk ``idx`` if a body of ``length`` bytes may be
    it: callers check before they invite the body (``100 Continue``)."""
    if session.committed:
        raise BlobdError("conflict", "this upload is complete already")
    if not 0 <= idx < session.chunks:
        raise BlobdError("bad_request", f"chunk index {idx} is out of range: this upload"
                         f" has chunks 0 to {session.chunks - 1}")
    start, span = session.chunk_span(idx)
    if length is not None and length != span:
        raise BlobdError("bad_request", f"chunk {idx} is {span} bytes, not {length}")
    return start, span


async def receive_chunk(store: Store, session: Session, idx: int,
                        body: AsyncIterator[bytes], *, length: int | None,
                        checks: list[Check], invite: Invite = _no_invite) -> None:
    """Write chunk ``idx``; a chunk received before is read, checked and
    dropped, so a repeat can never change bytes already acknowledged.
    ``invite`` (100 Continue) once the chunk is this request's to receive."""
    start, span = check_chunk(session, idx, length)
    fd = await _open(store, session, exclusive=False)
    try:
        # A second copy of the chunk in flight, in this worker or another,
        # never writes over (or under) the first: it asks the first to let
        # go (a resumed upload whose earlier try stalled), else is refused.
        # Once it holds the range, it sees whether the chunk is recorded.
        if span and not await take_over(
                store.layout.upload_path(session.id), idx,
                lambda: True if sessionfiles.lock_range(fd, start, span) else None):
            raise BlobdError("conflict", f"chunk {idx} is being received already",
                             headers=BUSY)
        await _receive_chunk(store, session, idx, body, checks, fd, start, span, invite)
    finally:
        await asyncio.to_thread(sessionfiles.close, fd)


async def _receive_chunk(store: Store, session: Session, idx: int,
                         body: AsyncIterator[bytes], checks: list[Check], fd: int,
                         start: int, span: int, invite: Invite) -> None:
    current = await _alive(store, session)
    if current.committed:
        raise BlobdError("conflict", "this upload is complete already")
    have = await index_sessions.has_chunk(store.db.reader, session.id, idx)
    sink = _Sink(None if have else fd, start, checks)

    def too_long() -> BlobdError:
        return BlobdError("bad_request", f"chunk {idx} is {span} bytes; more were sent")

    await invite()
    await _pump(body, sink, span, too_long, keep_partial=False,
                idle=store.config.uploads.idle_timeout_seconds,
                preemption=_Preemption(fd, (sessionfiles.WHOLE, idx)))
    if sink.written != span:
        raise BlobdError("bad_request",
                         f"chunk {idx} ended after {sink.written} of {span} bytes")
    sink.verify(None)
    if not have:
        await shielded(_record_chunk(store, current, idx, span, fd))


async def _record_chunk(store: Store, session: Session, idx: int, span: int,
                        fd: int) -> None:
    if store.config.storage.fsync:
        await asyncio.to_thread(sessionfiles.sync, fd)
    async with store.write() as tx:
        current = await _locked_row(tx, session)
        if current.committed:
            raise BlobdError("conflict", "this upload is complete already")
        if await index_sessions.mark_chunk(tx.conn, session.id, idx):
            await index.charge_upload(tx.conn, session.owner, span,
                                      store.config.quota_for(session.owner))
        await index_sessions.touch(tx.conn, session.id, expiry(store, time.time()))


# -- tus: bytes at an offset -------------------------------------------------

async def receive_at_offset(store: Store, session: Session, offset: int,
                            body: AsyncIterator[bytes], *, length: int | None,
                            checks: list[Check], new_length: int | None = None,
                            status_on_mismatch: int | None = None,
                            invite: Invite = _no_invite) -> Session:
    """Append a body at ``offset``, which must be where the upload stands.

    Without a checksum, bytes that arrived before the connection dropped
    are kept and the offset moves past them; with one, nothing counts
    unless the whole body matches it. ``invite`` (100 Continue) once the
    upload is this request's and the body fits.
    """
    fd = await _open(store, session, exclusive=True)
    try:
        current = await _alive(store, session)
        if current.is_final:
            raise BlobdError("forbidden", FINAL_TAKES_NO_PATCH)
        if current.upload_offset != offset:
            raise BlobdError("conflict", f"Upload-Offset is {offset}, but the upload"
                             f" stands at {current.upload_offset}")
        if new_length is not None and new_length != current.size:
            current = await _fix_length(store, current, new_length)
        return await _append(store, current, fd, body, length, checks, status_on_mismatch,
                             invite)
    finally:
        await asyncio.to_thread(sessionfiles.close, fd)


async def _append(store: Store, session: Session, fd: int, body: AsyncIterator[bytes],
                  length: int | None, checks: list[Check],
                  status_on_mismatch: int | None, invite: Invite) -> Session:
    room = await check_room(store, session, length)
    ahead = Ahead(store, session, fd) if session.size is None else None
    try:
        if ahead is not None and length:
            # A declared body's room is reserved before it is invited, so
            # one that does not fit is refused before it is sent.
            await ahead.grow(length, declared=True)
        return await _receive(store, session, fd, body, room, ahead, checks,
                              status_on_mismatch, invite)
    finally:
        if ahead is not None:
            # Whatever was not recorded: cut from the file and released.
            await shielded(ahead.settle())


async def _receive(store: Store, session: Session, fd: int, body: AsyncIterator[bytes],
                   room: Room, ahead: Ahead | None, checks: list[Check],
                   status_on_mismatch: int | None, invite: Invite) -> Session:
    sink = _Sink(fd, session.upload_offset, checks)
    # A declared body was granted its room already; one of unknown length
    # is granted it a slice at a time as it comes.
    grow = None if ahead is None else functools.partial(ahead.grow,
                                                        declared=ahead.granted > 0)
    await invite()
    try:
        await _pump(body, sink, room.size if ahead is None else ahead.granted,
                    lambda: room.error, keep_partial=not checks,
                    idle=store.config.uploads.idle_timeout_seconds,
                    preemption=_Preemption(fd, (sessionfiles.WHOLE,)), grow=grow)
    except BaseException as exc:
        if not checks and sink.written and broke_off(exc):
            await shielded(_keep_progress(store, session, fd, sink.written, ahead))
        raise
    sink.verify(status_on_mismatch)
    if not sink.written:
        return session
    return await shielded(_record_offset(store, session, fd, sink.written, ahead))


async def _record_offset(store: Store, session: Session, fd: int, count: int,
                         ahead: Ahead | None) -> Session:
    new_offset, expires_at = session.upload_offset + count, expiry(store, time.time())
    if ahead is not None:
        # Room granted past the bytes received is cut from the file here
        # and released in the transaction below.
        await asyncio.to_thread(sessionfiles.cut_open, fd, new_offset)
    if store.config.storage.fsync:
        await asyncio.to_thread(sessionfiles.sync, fd)
    async with store.write() as tx:
        if not await index_sessions.advance(tx.conn, session.id, session.upload_offset,
                                            new_offset):
            raise BlobdError("conflict", "the upload moved on meanwhile")
        if ahead is not None:
            # Reserved before they were read (see sessionroom.Ahead); what
            # the upload holds is now what it received.
            await index_sessions.hold(tx.conn, session, new_offset)
        await index.charge_upload(tx.conn, session.owner, count,
                                  store.config.quota_for(session.owner))
        await index_sessions.touch(tx.conn, session.id, expires_at)
    if ahead is not None:
        ahead.granted = 0
    reserved = new_offset if session.size is None else session.reserved_bytes
    return replace(session, upload_offset=new_offset, expires_at=expires_at,
                   reserved_bytes=reserved)


async def _keep_progress(store: Store, session: Session, fd: int, count: int,
                         ahead: Ahead | None) -> None:
    try:
        await _record_offset(store, session, fd, count, ahead)
        log.info("upload %s: kept %d bytes received before the connection dropped",
                 session.id, count)
    except Exception as exc:  # the request has failed already; this is salvage
        log.warning("upload %s: could not keep %d bytes received before the"
                    " connection dropped: %s", session.id, count, exc)


async def _fix_length(store: Store, session: Session, size: int) -> Session:
    """Set a deferred length (tus ``Upload-Length`` on a PATCH), once."""
    if session.size is not None:
        raise BlobdError("bad_request", "Upload-Length is set already")
    if size < session.upload_offset:
        raise BlobdError("bad_request", f"Upload-Length {size} is below the"
                         f" {session.upload_offset} bytes received")

    async def run() -> None:
        async with store.write() as tx:
            # What it received is reserved already (see sessionroom.Ahead).
            await check_reservation(store, tx, session.owner, size,
                                    held=session.reserved_bytes, new=False)
            # Deleted or expired since it was read (the free-space check and
            # the lock are waits): nothing to reserve for.
            if not await index_sessions.set_length(tx.conn, session, size):
                raise BlobdError("not_found", f"no upload session {session.id}")
        # In the same shielded run: a request cut off here must not leave
        # the length set and the file uncut.
        await asyncio.to_thread(sessionfiles.extend, store.layout.upload_path(session.id),
                                size)

    # The size limits before the free disk (which the transaction cannot
    # check): a length over max_blob_size is 413 whatever the disk holds,
    # as PUT, POST /uploads and tus creation answer it.
    limits = await index.limits_for(store.db.reader, session.owner,
                                    store.config.quota_for(session.owner))
    index.check_blob_size(size, limits, store.config.limits.max_blob_size)
    await store.check_free_space(size - session.upload_offset)
    await shielded(run())
    return replace(session, size=size, reserved_bytes=size)
