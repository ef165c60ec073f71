"""Every SQL statement about resumable upload sessions.

A session is one ``uploads`` row (plus, for the native protocol, one
``upload_chunks`` row per chunk received) and one preallocated data file,
``layout.upload_path(id)``. Invariants kept here, inside each transaction:

* ``owners.reserved_bytes`` includes ``uploads.reserved_bytes`` of every
  session that is neither committed nor removed; a session's reservation is
  released in the transaction that commits or removes it;
* a deferred-length session reserves what it received plus the room a
  PATCH in progress holds ahead of its bytes (see :mod:`blobd.sessionroom`);
  room a crash kept from being given back is set right by its next PATCH,
  which sets the reservation rather than adding to it (:func:`hold`);
* a committed session (``result_hash`` set) is never written to again; its
  row stays until it expires so that tus ``HEAD`` can still name the blob.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import aiosqlite

from . import index

NATIVE = "native"
TUS = "tus"


@dataclass(frozen=True)
class Session:
    id: str
    owner: str
    protocol: str
    size: int | None            # None while a tus length is deferred
    chunk_size: int             # 0 for tus, which counts an offset instead
    expected_hash: str | None   # an address as the client gave it
    content_type: str | None
    ref: str | None
    metadata: str | None        # tus Upload-Metadata as received
    concat: str | None          # tus Upload-Concat as received
    upload_offset: int
    reserved_bytes: int
    created_at: float
    expires_at: float
    result_hash: str | None = None

    @classmethod
    def from_row(cls, row: aiosqlite.Row) -> "Session":
        return cls(*(row[name] for name in _COLUMNS))

    @property
    def committed(self) -> bool:
        return self.result_hash is not None

    @property
    def chunks(self) -> int:
        if self.size is None or not self.chunk_size:
            return 0
        return math.ceil(self.size / self.chunk_size)

    def chunk_span(self, idx: int) -> tuple[int, int]:
        """(offset, length) of chunk ``idx``; every chunk is full but the last."""
        assert self.size is not None
        start = idx * self.chunk_size
        return start, min(self.chunk_size, self.size - start)

    @property
    def is_partial(self) -> bool:
        return self.concat == "partial"

    @property
    def is_final(self) -> bool:
        """A tus concatenation's result: made whole, it takes no PATCH."""
        return self.concat is not None and self.concat.startswith("final")


_COLUMNS = ("id", "owner", "protocol", "size", "chunk_size", "expected_hash",
            "content_type", "ref", "metadata", "concat", "upload_offset",
            "reserved_bytes", "created_at", "expires_at", "result_hash")


async def insert(conn: aiosqlite.Connection, session: Session) -> None:
    await conn.execute(
        f"INSERT INTO uploads ({', '.join(_COLUMNS)})"
        f" VALUES ({', '.join('?' for _ in _COLUMNS)})",
        tuple(getattr(session, name) for name in _COLUMNS))
    if session.result_hash is None:
        await index.reserve(conn, session.owner, session.reserved_bytes, blobs=1)


async def get(conn: aiosqlite.Connection, session_id: str, owner: str,
              now: float) -> Session | None:
    """The owner's live (unexpired) session; None for anyone else's."""
    async with conn.execute("SELECT * FROM uploads WHERE id = ? AND owner = ?"
                            " AND expires_at > ?", (session_id, owner, now)) as cur:
        row = await cur.fetchone()
    return Session.from_row(row) if row else None


async def list_open(conn: aiosqlite.Connection, owner: str, protocol: str,
                    now: float) -> list[Session]:
    async with conn.execute(
            "SELECT * FROM uploads WHERE owner = ? AND protocol = ? AND expires_at > ?"
            " AND result_hash IS NULL ORDER BY created_at", (owner, protocol, now)) as cur:
        return [Session.from_row(r) for r in await cur.fetchall()]


async def count_open(conn: aiosqlite.Connection, owner: str, now: float) -> int:
    async with conn.execute("SELECT COUNT(*) FROM uploads WHERE owner = ?"
                            " AND expires_at > ? AND result_hash IS NULL",
                            (owner, now)) as cur:
        (count,) = await cur.fetchone()
    return int(count)


async def forget_finished(conn: aiosqlite.Connection, owner: str, keep: int) -> None:
    """Remove all but the owner's ``keep`` newest committed sessions: their
    rows only let a repeated completion or a tus ``HEAD`` name the blob
    again, and unbounded they would let a writer grow the index at will
    (a committed session counts against no limit)."""
    await conn.execute(
        "DELETE FROM uploads WHERE owner = ? AND result_hash IS NOT NULL AND id NOT IN"
        " (SELECT id FROM uploads WHERE owner = ? AND result_hash IS NOT NULL"
        " ORDER BY created_at DESC LIMIT ?)", (owner, owner, keep))


async def received(conn: aiosqlite.Connection, session_id: str) -> list[int]:
    async with conn.execute("SELECT idx FROM upload_chunks WHERE upload_id = ?"
                            " ORDER BY idx", (session_id,)) as cur:
        return [r["idx"] for r in await cur.fetchall()]


async def has_chunk(conn: aiosqlite.Connection, session_id: str, idx: int) -> bool:
    async with conn.execute("SELECT 1 FROM upload_chunks WHERE upload_id = ? AND idx = ?",
                            (session_id, idx)) as cur:
        return await cur.fetchone() is not None


async def mark_chunk(conn: aiosqlite.Connection, session_id: str, idx: int) -> bool:
    """Record a chunk as received; False when it already was."""
    cur = await conn.execute("INSERT OR IGNORE INTO upload_chunks (upload_id, idx)"
                             " VALUES (?, ?)", (session_id, idx))
    return cur.rowcount == 1


async def advance(conn: aiosqlite.Connection, session_id: str, old_offset: int,
                  new_offset: int) -> bool:
    """Move a tus offset forward from exactly ``old_offset``; False if it moved."""
    cur = await conn.execute(
        "UPDATE uploads SET upload_offset = ? WHERE id = ? AND upload_offset = ?"
        " AND result_hash IS NULL", (new_offset, session_id, old_offset))
    return cur.rowcount == 1


async def keep_alive(conn: aiosqlite.Connection, session_id: str, owner: str, now: float,
                     expires_at: float) -> Session | None:
    """The owner's live session with its expiry pushed to ``expires_at``;
    None if it is gone or expired."""
    async with conn.execute("UPDATE uploads SET expires_at = ? WHERE id = ? AND owner = ?"
                            " AND expires_at > ? RETURNING *",
                            (expires_at, session_id, owner, now)) as cur:
        row = await cur.fetchone()
    return Session.from_row(row) if row else None


async def touch(conn: aiosqlite.Connection, session_id: str, expires_at: float) -> None:
    await conn.execute("UPDATE uploads SET expires_at = ? WHERE id = ?",
                       (expires_at, session_id))


async def holding_ahead(conn: aiosqlite.Connection) -> list[Session]:
    """Open deferred-length uploads that reserve more than they hold: the
    room a PATCH took before reading its bytes, left by a crash."""
    async with conn.execute("SELECT * FROM uploads WHERE size IS NULL AND result_hash"
                            " IS NULL AND reserved_bytes > upload_offset") as cur:
        return [Session.from_row(row) for row in await cur.fetchall()]


async def held(conn: aiosqlite.Connection, session_id: str) -> int | None:
    """What an open deferred-length upload reserves; None once it is gone,
    committed or has its length."""
    return await _reserved(conn, session_id, "size IS NULL AND result_hash IS NULL")


async def hold(conn: aiosqlite.Connection, session: Session, nbytes: int) -> bool:
    """Make an open deferred-length upload reserve ``nbytes`` (its length
    unknown, it reserves what it holds and what a PATCH is about to
    receive), moving the difference in or out of the owner's reservation;
    False, reserving nothing, when it is gone, committed or has its length."""
    current = await held(conn, session.id)
    if current is None:
        return False
    await conn.execute("UPDATE uploads SET reserved_bytes = ? WHERE id = ?",
                       (nbytes, session.id))
    await index.reserve(conn, session.owner, nbytes - current)
    return True


async def _reserved(conn: aiosqlite.Connection, session_id: str, where: str) -> int | None:
    async with conn.execute(f"SELECT reserved_bytes FROM uploads WHERE id = ? AND {where}",
                            (session_id,)) as cur:
        row = await cur.fetchone()
    return None if row is None else row[0]


async def set_length(conn: aiosqlite.Connection, session: Session, size: int) -> bool:
    """Fix a deferred tus length, reserving it against the owner's quota;
    False (nothing reserved) when the session is gone, committed, or has its
    length already: the reservation must have a row that will release it."""
    held = await _reserved(conn, session.id, "size IS NULL AND result_hash IS NULL")
    if held is None:
        return False
    await conn.execute("UPDATE uploads SET size = ?, reserved_bytes = ? WHERE id = ?",
                       (size, size, session.id))
    await index.reserve(conn, session.owner, size - held)
    return True


async def mark_committed(conn: aiosqlite.Connection, session: Session, digest: str,
                         expires_at: float) -> bool:
    """Claim the session for its blob and release its reservation; False when
    it is gone or was committed already (the caller rolls back)."""
    held = await _reserved(conn, session.id, "result_hash IS NULL")
    if held is None:
        return False
    await conn.execute("UPDATE uploads SET result_hash = ?, reserved_bytes = 0,"
                       " expires_at = ? WHERE id = ?", (digest, expires_at, session.id))
    await index.reserve(conn, session.owner, -held, blobs=-1)
    await conn.execute("DELETE FROM upload_chunks WHERE upload_id = ?", (session.id,))
    return True


async def delete(conn: aiosqlite.Connection, session_id: str,
                 expired_by: float | None = None) -> Session | None:
    """Remove a session row (only if it expired by ``expired_by``, when
    given), releasing what it still reserves."""
    where = "id = ?" if expired_by is None else "id = ? AND expires_at <= ?"
    params = (session_id,) if expired_by is None else (session_id, expired_by)
    async with conn.execute(f"SELECT * FROM uploads WHERE {where}", params) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    session = Session.from_row(row)
    await conn.execute("DELETE FROM uploads WHERE id = ?", (session_id,))
    if session.result_hash is None:
        await index.reserve(conn, session.owner, -session.reserved_bytes, blobs=-1)
    return session


async def expired_ids(conn: aiosqlite.Connection, now: float, after: str = "",
                      limit: int = 500) -> list[str]:
    """Ids of sessions expired by ``now``, in order, from past ``after``."""
    async with conn.execute("SELECT id FROM uploads WHERE expires_at <= ? AND id > ?"
                            " ORDER BY id LIMIT ?", (now, after, limit)) as cur:
        return [r["id"] for r in await cur.fetchall()]


async def committed_ids(conn: aiosqlite.Connection) -> set[str]:
    """Sessions committed already: their data files are the blobs' now."""
    async with conn.execute("SELECT id FROM uploads WHERE result_hash IS NOT NULL") as cur:
        return {r["id"] for r in await cur.fetchall()}


async def open_ids(conn: aiosqlite.Connection, created_before: float | None = None
                   ) -> set[str]:
    """Sessions that still own their data file (not committed), or only
    those made before ``created_before``."""
    sql, params = "SELECT id FROM uploads WHERE result_hash IS NULL", ()
    if created_before is not None:
        sql, params = sql + " AND created_at < ?", (created_before,)
    async with conn.execute(sql, params) as cur:
        return {r["id"] for r in await cur.fetchall()}


async def open_lengths(conn: aiosqlite.Connection) -> dict[str, tuple[int, float]]:
    """Open sessions whose length is known: id -> (size, expires_at)."""
    async with conn.execute("SELECT id, size, expires_at FROM uploads"
                            " WHERE result_hash IS NULL AND size IS NOT NULL") as cur:
        return {r["id"]: (r["size"], r["expires_at"]) for r in await cur.fetchall()}
