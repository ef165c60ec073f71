"""tus concatenation: a final upload made of finished partial uploads.

Clients such as tus-js-client upload a file as several partial uploads in
parallel, then ask for the final upload ``Upload-Concat: final;<urls>``.
The parts' files are joined into the final session's file (in the kernel),
and in one transaction the parts are removed, their reservations released
and the final session, all of whose bytes are present, inserted. The parts'
bytes were charged to the monthly quota as they arrived; joining them
charges nothing.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from . import files, index, index_sessions, sessionfiles
from .errors import BlobdError
from .index_sessions import TUS, Session
from .sessions import (NewSession, check_ref_room, check_reservation, expiry, find_session,
                       new_session_id)
from .store import Store, shielded


async def concatenate(store: Store, spec: NewSession, part_ids: list[str]) -> Session:
    parts = [await _finished_part(store, spec.owner, part_id) for part_id in part_ids]
    if not parts:
        raise BlobdError("bad_request", "Upload-Concat: final needs at least one part")
    if len(set(part_ids)) != len(part_ids):
        raise BlobdError("bad_request", "Upload-Concat: a part is named twice")
    total = sum(p.size or 0 for p in parts)
    limits = await index.limits_for(store.db.reader, spec.owner,
                                    store.config.quota_for(spec.owner))
    index.check_blob_size(total, limits, store.config.limits.max_blob_size)
    await store.check_free_space(total)
    now = time.time()
    session = Session(
        id=new_session_id(), owner=spec.owner, protocol=TUS, size=total, chunk_size=0,
        expected_hash=str(spec.expected) if spec.expected else None,
        content_type=spec.content_type, ref=spec.ref, metadata=spec.metadata,
        concat=spec.concat, upload_offset=total, reserved_bytes=total, created_at=now,
        expires_at=expiry(store, now))
    path = store.layout.upload_path(session.id)
    sources = [store.layout.upload_path(p.id) for p in parts]
    await asyncio.to_thread(sessionfiles.concatenate,
                            [(source, p.size or 0) for source, p in zip(sources, parts)],
                            path, store.config.storage.fsync)
    # One shielded run: a request cut off (a shutdown) once the swap has
    # committed must not take the final upload's file for a failed one's,
    # the parts' rows being gone with their bytes now only in it.
    await shielded(_install(store, session, parts, path, sources))
    return session


async def _install(store: Store, session: Session, parts: list[Session], path: Path,
                   sources: list[Path]) -> None:
    try:
        await _swap(store, session, parts)
    except BaseException:
        await asyncio.to_thread(files.remove_quietly, path)
        raise
    await asyncio.to_thread(files.remove_quietly, *sources)


async def _finished_part(store: Store, owner: str, part_id: str) -> Session:
    try:
        part = await find_session(store, part_id, owner, TUS)
    except BlobdError:
        raise BlobdError("bad_request", f"Upload-Concat: no upload {part_id}") from None
    if not part.is_partial:
        raise BlobdError("bad_request", f"Upload-Concat: {part_id} is not a partial upload")
    if part.size is None or part.upload_offset < part.size:
        raise BlobdError("bad_request", f"Upload-Concat: {part_id} is not finished")
    return part


async def _swap(store: Store, session: Session, parts: list[Session]) -> None:
    async with store.write() as tx:
        for part in parts:
            gone = await index_sessions.delete(tx.conn, part.id)
            if gone is None or gone.upload_offset != part.upload_offset:
                raise BlobdError("bad_request",
                                 f"Upload-Concat: {part.id} changed or went away")
        await check_reservation(store, tx, session.owner, session.size)
        await check_ref_room(store, tx, session)
        await index_sessions.insert(tx.conn, session)
