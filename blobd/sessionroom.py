"""Room for the bytes of a tus PATCH: how many an upload may still take,
and, while its length is deferred, the reservation made ahead of them.

An upload of known length reserved all of it at creation (or when its
length was set) and has its file allocated, so its room is its length.
One whose length is deferred reserves as it grows: before a PATCH reads a
byte, :class:`Ahead` reserves room for it against the owner's limits in a
write transaction, growing the upload's ``reserved_bytes``, and allocates
it in the file past the offset, where the free-space floor sees it. So
concurrent PATCHes, in this worker or another, can never together pass
``max_bytes`` or the floor (found by review: checked only once written,
five parallel 9 MiB PATCHes left 46 MiB on disk against a 20 MiB quota).
What the PATCH did not record is cut from the file and released when it
ends (:meth:`Ahead.settle`), so a refused one leaves nothing.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, replace

from . import files, index, index_sessions, sessionfiles
from .config import QuotaLimits
from .errors import BlobdError
from .index_sessions import Session
from .store import Store, shielded

# What a deferred-length PATCH without Content-Length reserves (and
# allocates) at a time, as its body comes: one transaction per slice, and
# never more than this held ahead of the bytes.
RESERVE_SLICE = 8 << 20
# Allocations made against the free-space floor, one at a time in a worker
# (see Ahead._allocate); held for a statvfs and an fallocate, in a thread.
_ALLOCATING = threading.Lock()


@dataclass(frozen=True)
class Room:
    """How many more bytes an upload may take, and what passing them is."""
    size: int
    error: BlobdError


def _bounds(store: Store, limits: QuotaLimits, end: int, quota_room: int,
            month_room: int, disk_room: int) -> list[Room]:
    """The rooms a deferred-length upload standing at ``end`` has left, in
    the order a declared body is refused by: the blob size, the owner's
    bytes, this month's uploads, the free-space floor."""
    max_size = min(limits.max_blob_size, store.config.limits.max_blob_size)
    return [
        Room(max_size - end, BlobdError(
            "too_large", f"an upload of unknown length would grow past max_blob_size"
            f" ({max_size} bytes)")),
        Room(quota_room, BlobdError(
            "quota_exceeded", f"quota max_bytes ({limits.max_bytes} bytes) would be exceeded")),
        Room(month_room, BlobdError(
            "quota_exceeded", "quota max_monthly_upload_bytes"
            f" ({limits.max_monthly_upload_bytes} bytes) would be exceeded")),
        Room(disk_room, BlobdError(
            "insufficient_storage", "not enough free disk space for this upload")),
    ]


def _fit(bounds: list[Room], length: int | None) -> Room:
    """The smallest room; a ``length`` over one of them is refused by the
    first it passes: one over max_blob_size is 413 even when the disk is
    fuller still."""
    if length is not None:
        for bound in bounds:
            if length > max(bound.size, 0):
                raise bound.error
    room = min(bounds, key=lambda bound: bound.size)
    return replace(room, size=max(room.size, 0))


async def _disk_room(store: Store) -> int:
    free, _ = await asyncio.to_thread(files.free_bytes, store.layout.root)
    return free - store.config.storage.min_free_bytes


async def check_room(store: Store, session: Session, length: int | None,
                     new_length: int | None = None) -> Room:
    """Refuse a declared body that would end past the upload's length;
    the room the upload has left. Also called before ``100 Continue``, so
    such a body is never sent.

    While the length is deferred this is an estimate, outside any
    transaction: what the owner's limits and the disk still allow. The
    authoritative check is :class:`Ahead`'s reservation."""
    offset = session.upload_offset
    size = new_length if new_length is not None else session.size
    if size is not None:
        room = Room(size - offset, BlobdError(
            "bad_request", f"the body would end past byte {size}"))
        if length is not None and length > room.size:
            raise BlobdError("bad_request", f"{length} bytes at offset {offset}"
                             f" would end past {size}")
        return room
    limits = await index.limits_for(store.db.reader, session.owner,
                                    store.config.quota_for(session.owner))
    used = await index.usage(store.db.reader, session.owner)
    return _fit(_bounds(
        store, limits, offset,
        limits.max_bytes - used["used_bytes"] - used["reserved_bytes"],
        limits.max_monthly_upload_bytes - used["monthly_upload_bytes"],
        await _disk_room(store)), length)


class Ahead:
    """The room one PATCH holds ahead of its bytes in a deferred-length
    upload whose file lock it holds (so nothing else changes the upload's
    reservation meanwhile): ``granted`` bytes past the offset, reserved
    and allocated."""

    def __init__(self, store: Store, session: Session, fd: int) -> None:
        self.store, self.session, self.fd = store, session, fd
        self.granted = 0

    async def grow(self, total: int, declared: bool) -> int:
        """Room for ``total`` bytes past the offset, reserved before they
        are read: exactly that for a ``declared`` body (its Content-Length),
        else up to RESERVE_SLICE ahead of them. The room now granted; the
        limit passed is raised, and the PATCH is then refused whole."""
        if total > self.granted:
            await shielded(self._take(total - self.granted, declared))
        return self.granted

    async def _take(self, need: int, declared: bool) -> None:
        store, session = self.store, self.session
        start = session.upload_offset + self.granted
        disk_room = await _disk_room(store)
        async with store.write() as tx:
            row = await index.owner_row(tx.conn, session.owner)
            limits = index.effective_limits(row, store.config.quota_for(session.owner))
            held = await index_sessions.held(tx.conn, session.id)
            if held is None:
                raise BlobdError("not_found", f"no upload session {session.id}")
            # What the row holds past ``start`` (a PATCH cut off by a
            # crash before it settled) is this upload's, not another's.
            others = row["used_bytes"] + row["reserved_bytes"] - held
            room = _fit(_bounds(
                store, limits, start, limits.max_bytes - others - start,
                limits.max_monthly_upload_bytes - row["monthly_upload_bytes"] - self.granted,
                disk_room), need)
            take = need if declared else max(need, min(RESERVE_SLICE, room.size))
            await index_sessions.hold(tx.conn, session, start + take)
        self.granted += take
        await asyncio.to_thread(self._allocate, start, take)

    def _allocate(self, start: int, length: int) -> None:
        """Allocate the bytes granted in the file, then look at the floor:
        a PATCH of another worker that passed it at the same moment is on
        the disk by now, so of two that together would pass it, one is
        refused (perhaps both). In one worker they take turns, so that
        neither is refused for room the other is about to give back."""
        floor = self.store.config.storage.min_free_bytes
        with _ALLOCATING:
            free, _ = files.free_bytes(self.store.layout.root)
            if free - length >= floor:
                sessionfiles.allocate(self.fd, start, length)
                free, _ = files.free_bytes(self.store.layout.root)
                if free >= floor:
                    return
        raise BlobdError("insufficient_storage", "not enough free disk space for"
                         " this upload")

    async def settle(self) -> None:
        """Give back what was granted and not recorded: cut from the file
        (first, so the disk never holds bytes no reservation covers), then
        released. After a recorded PATCH (``granted`` 0) nothing to do."""
        if not self.granted:
            return
        offset = self.session.upload_offset
        await asyncio.to_thread(sessionfiles.cut_open, self.fd, offset)
        async with self.store.write() as tx:
            await index_sessions.hold(tx.conn, self.session, offset)
        self.granted = 0
