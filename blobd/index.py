"""Every SQL statement about blobs, references, holdings, owners and counters.

Functions take a connection: the write transaction's for changes, the read
connection for lookups. Invariants kept here, inside each transaction:

* ``blobs.refcount`` = number of ``refs`` rows naming the blob, all owners;
* one ``holdings`` row per (owner, blob) with ``refs`` = that owner's refs;
* ``owners.used_bytes`` / ``used_blobs`` = sum over the owner's holdings;
* ``owners.used_refs`` = number of the owner's ``refs`` rows.

Quota limits are checked where a holding or a reference name is created,
in the same transaction, so concurrent uploads can never push an owner
over a limit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Mapping

import aiosqlite

from .audio.info import complete_json
from .config import QuotaLimits
from .errors import BlobdError

LIMIT_KEYS = ("max_bytes", "max_blobs", "max_blob_size", "max_monthly_upload_bytes",
              "max_refs")


@dataclass(frozen=True)
class BlobRecord:
    hash: str
    sha256: str
    size: int
    content_type: str
    created_at: float
    refcount: int = 0
    zero_at: float | None = None
    audio: dict[str, Any] | None = None
    mirror_state: str = "off"

    @classmethod
    def from_row(cls, row: aiosqlite.Row) -> "BlobRecord":
        return cls(row["hash"], row["sha256"], row["size"], row["content_type"],
                   row["created_at"], row["refcount"], row["zero_at"],
                   decode_audio(row["audio"]), row["mirror_state"])

    @property
    def live(self) -> bool:
        """Referenced by someone; a blob at zero is waiting for deletion."""
        return self.refcount > 0


def decode_audio(text: str | None) -> dict[str, Any] | None:
    """The ``blobs.audio`` column: the probe's JSON object, or NULL. An
    object stored before the probe reported a key reads with it null."""
    return complete_json(json.loads(text)) if text else None


def encode_audio(audio: dict[str, Any] | None) -> str | None:
    return json.dumps(audio) if audio else None


# execute_fetchall is one trip to the connection's thread; execute, fetchone
# and the cursor's close would be three, and each trip costs more CPU (thread
# wake-ups) than the query itself.
async def _one(conn: aiosqlite.Connection, sql: str, *params: Any) -> aiosqlite.Row | None:
    rows = await conn.execute_fetchall(sql, params)
    return rows[0] if rows else None


async def _all(conn: aiosqlite.Connection, sql: str, *params: Any) -> list[aiosqlite.Row]:
    return list(await conn.execute_fetchall(sql, params))


# -- blobs -------------------------------------------------------------------

async def remember_deleted(conn: aiosqlite.Connection, digest: str, now: float) -> None:
    """Record that a mirrored blob was deleted (see migration 4)."""
    await conn.execute("INSERT OR REPLACE INTO deleted_blobs (hash, deleted_at)"
                       " VALUES (?, ?)", (digest, now))


async def forget_deleted(conn: aiosqlite.Connection, digest: str) -> None:
    """Its object is gone from the bucket: nothing left to tell apart."""
    await conn.execute("DELETE FROM deleted_blobs WHERE hash = ?", (digest,))


async def deleted_at(conn: aiosqlite.Connection, digest: str) -> float | None:
    """When the blob was last deleted while mirrored, if that is remembered
    (the row outlives a later incarnation of the same content)."""
    row = await _one(conn, "SELECT deleted_at FROM deleted_blobs WHERE hash = ?", digest)
    return row[0] if row else None


async def deleted_blobs(conn: aiosqlite.Connection) -> dict[str, float]:
    """{digest: when it was deleted} of every blob remembered as deleted."""
    return {row[0]: row[1] for row in await _all(
        conn, "SELECT hash, deleted_at FROM deleted_blobs")}


async def get_blob(conn: aiosqlite.Connection, digest: str) -> BlobRecord | None:
    row = await _one(conn, "SELECT * FROM blobs WHERE hash = ?", digest)
    return BlobRecord.from_row(row) if row else None


async def hash_for_sha256(conn: aiosqlite.Connection, sha256: str) -> str | None:
    row = await _one(conn, "SELECT hash FROM blobs WHERE sha256 = ?", sha256)
    return row["hash"] if row else None


async def insert_blob(conn: aiosqlite.Connection, blob: BlobRecord) -> None:
    await conn.execute(
        "INSERT INTO blobs (hash, sha256, size, content_type, created_at, refcount,"
        " audio, mirror_state) VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
        (blob.hash, blob.sha256, blob.size, blob.content_type, blob.created_at,
         encode_audio(blob.audio), blob.mirror_state),
    )


async def delete_blob(conn: aiosqlite.Connection, digest: str) -> str | None:
    """Remove the row of a blob nobody references; its mirror state, or
    None if it was revived."""
    row = await _one(conn, "DELETE FROM blobs WHERE hash = ? AND refcount = 0"
                     " RETURNING mirror_state", digest)
    return row[0] if row else None


async def blobs_due_for_deletion(conn: aiosqlite.Connection, zero_before: float,
                                 limit: int = 500) -> list[str]:
    rows = await _all(conn, "SELECT hash FROM blobs WHERE zero_at IS NOT NULL"
                      " AND zero_at <= ? AND refcount = 0 LIMIT ?", zero_before, limit)
    return [r["hash"] for r in rows]


async def all_blobs(conn: aiosqlite.Connection) -> list[BlobRecord]:
    """Every blob row, those in their grace period too (mirror sync, restore)."""
    return [BlobRecord.from_row(r) for r in await _all(conn, "SELECT * FROM blobs")]


async def count_blobs(conn: aiosqlite.Connection) -> int:
    row = await _one(conn, "SELECT count(*) FROM blobs")
    return int(row[0]) if row else 0


async def descriptions_after(conn: aiosqlite.Connection, after: str,
                             limit: int) -> list[aiosqlite.Row]:
    """(hash, size, content_type, audio as stored) of the next ``limit`` blobs
    in hash order after ``after``: a scan of every blob one page at a
    time, each page its own short read (blobd reprobe)."""
    return await _all(conn, "SELECT hash, size, content_type, audio FROM blobs WHERE hash > ?"
                      " ORDER BY hash LIMIT ?", after, limit)


async def description_of(conn: aiosqlite.Connection, digest: str) -> aiosqlite.Row | None:
    """:func:`descriptions_after`'s columns for one blob."""
    return await _one(conn, "SELECT hash, size, content_type, audio FROM blobs WHERE hash = ?",
                      digest)


async def redescribe(conn: aiosqlite.Connection, digest: str, old_type: str,
                     old_audio: str | None, content_type: str,
                     audio: dict[str, Any] | None) -> bool:
    """Set a blob's content type and audio facts if its row still holds the
    ``old_type`` and ``old_audio`` (the column's text) read before: a blob
    deleted meanwhile is not brought back, one described anew meanwhile is
    left. Nothing else of the row changes. Whether it was set."""
    cur = await conn.execute(
        "UPDATE blobs SET content_type = ?, audio = ? WHERE hash = ?"
        " AND content_type = ? AND audio IS ?",
        (content_type, encode_audio(audio), digest, old_type, old_audio))
    return cur.rowcount == 1


async def set_mirror_state(conn: aiosqlite.Connection, digest: str, state: str) -> None:
    await conn.execute("UPDATE blobs SET mirror_state = ? WHERE hash = ?", (state, digest))


async def store_id(conn: aiosqlite.Connection) -> str:
    """The id this index was given when it was made (schema 2)."""
    row = await _one(conn, "SELECT value FROM meta WHERE name = 'store_id'")
    if row is None:
        raise BlobdError("internal", "the index has no store id")
    return str(row["value"])


async def blobs_after(conn: aiosqlite.Connection, after: str, limit: int) -> list[BlobRecord]:
    """The next ``limit`` blob rows in hash order after ``after`` (the scrub
    walks every blob one short read at a time)."""
    return [BlobRecord.from_row(r) for r in await _all(
        conn, "SELECT * FROM blobs WHERE hash > ? ORDER BY hash LIMIT ?", after, limit)]


async def get_meta(conn: aiosqlite.Connection, *names: str) -> dict[str, str]:
    """{name: value} of the ``meta`` rows asked for that exist."""
    marks = ", ".join("?" * len(names))
    return {r["name"]: r["value"] for r in await _all(
        conn, f"SELECT name, value FROM meta WHERE name IN ({marks})", *names)}


async def set_meta(conn: aiosqlite.Connection, **values: str | None) -> None:
    """Set ``meta`` rows in the caller's transaction; None removes one."""
    for name, value in values.items():
        if value is None:
            await conn.execute("DELETE FROM meta WHERE name = ?", (name,))
        else:
            await conn.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT(name)"
                               " DO UPDATE SET value = excluded.value", (name, value))


async def has_blobs(conn: aiosqlite.Connection) -> bool:
    return await _one(conn, "SELECT 1 FROM blobs LIMIT 1") is not None


# -- owners and quotas -------------------------------------------------------

def current_month(now: float | None = None) -> str:
    return time.strftime("%Y-%m", time.gmtime(now if now is not None else time.time()))


async def owner_row(conn: aiosqlite.Connection, owner: str) -> aiosqlite.Row:
    """The owner's row, created on first use, with the monthly counter rolled
    (one statement: it runs inside every upload's commit)."""
    row = await _one(
        conn,
        "INSERT INTO owners (owner, upload_month) VALUES (?, ?)"
        " ON CONFLICT(owner) DO UPDATE SET monthly_upload_bytes = CASE"
        " WHEN owners.upload_month = excluded.upload_month"
        " THEN owners.monthly_upload_bytes ELSE 0 END,"
        " upload_month = excluded.upload_month RETURNING *",
        owner, current_month())
    assert row is not None
    return row


def effective_limits(row: aiosqlite.Row | None, default: QuotaLimits) -> QuotaLimits:
    values = {k: getattr(default, k) for k in LIMIT_KEYS}
    if row is not None:
        values.update({k: row[k] for k in LIMIT_KEYS if row[k] is not None})
    return QuotaLimits(**values)


async def limits_for(conn: aiosqlite.Connection, owner: str,
                     default: QuotaLimits) -> QuotaLimits:
    row = await _one(conn, "SELECT * FROM owners WHERE owner = ?", owner)
    return effective_limits(row, default)


async def set_owner_limits(conn: aiosqlite.Connection, owner: str,
                           changes: dict[str, int | None]) -> None:
    await owner_row(conn, owner)
    for key, value in changes.items():
        if key not in LIMIT_KEYS:
            raise ValueError(key)
        await conn.execute(f"UPDATE owners SET {key} = ? WHERE owner = ?", (value, owner))


async def usage(conn: aiosqlite.Connection, owner: str) -> dict[str, int]:
    row = await _one(conn, "SELECT * FROM owners WHERE owner = ?", owner)
    if row is None:
        return {"used_bytes": 0, "used_blobs": 0, "used_refs": 0, "reserved_bytes": 0,
                "reserved_blobs": 0, "monthly_upload_bytes": 0}
    monthly = row["monthly_upload_bytes"] if row["upload_month"] == current_month() else 0
    return {"used_bytes": row["used_bytes"], "used_blobs": row["used_blobs"],
            "used_refs": row["used_refs"],
            "reserved_bytes": row["reserved_bytes"], "reserved_blobs": row["reserved_blobs"],
            "monthly_upload_bytes": monthly}


def check_blob_size(size: int, limits: QuotaLimits, server_max: int) -> None:
    limit = min(limits.max_blob_size, server_max)
    if size > limit:
        raise BlobdError("too_large", f"{size} bytes is over max_blob_size ({limit} bytes)")


def check_room(row: Mapping[str, Any], limits: QuotaLimits, add_bytes: int,
               add_blobs: int) -> None:
    """Raise quota_exceeded if adding this much would pass a limit (what
    open upload sessions reserve counting as used)."""
    if add_blobs and (row["used_blobs"] + row["reserved_blobs"] + add_blobs
                      > limits.max_blobs):
        reserved = (f", {row['reserved_blobs']} of them reserved by open upload sessions"
                    if row["reserved_blobs"] else "")
        raise BlobdError("quota_exceeded",
                         f"quota max_blobs ({limits.max_blobs}) would be exceeded"
                         f" ({row['used_blobs'] + row['reserved_blobs']} taken{reserved})")
    if add_bytes and (row["used_bytes"] + row["reserved_bytes"] + add_bytes
                      > limits.max_bytes):
        raise BlobdError("quota_exceeded",
                         f"quota max_bytes ({limits.max_bytes} bytes) would be exceeded")


async def charge_upload(conn: aiosqlite.Connection, owner: str, nbytes: int,
                        default: QuotaLimits) -> None:
    """Count bytes received this month against max_monthly_upload_bytes."""
    # One statement when the owner exists, this month's counter is running
    # and the bytes fit (nearly always); otherwise the full check below.
    fits = await conn.execute(
        "UPDATE owners SET monthly_upload_bytes = monthly_upload_bytes + ?"
        " WHERE owner = ? AND upload_month = ? AND monthly_upload_bytes + ?"
        " <= COALESCE(max_monthly_upload_bytes, ?)",
        (nbytes, owner, current_month(), nbytes, default.max_monthly_upload_bytes))
    if fits.rowcount:
        return
    row = await owner_row(conn, owner)
    limits = effective_limits(row, default)
    if row["monthly_upload_bytes"] + nbytes > limits.max_monthly_upload_bytes:
        raise BlobdError(
            "quota_exceeded",
            f"quota max_monthly_upload_bytes ({limits.max_monthly_upload_bytes} bytes)"
            " would be exceeded")
    await conn.execute(
        "UPDATE owners SET monthly_upload_bytes = monthly_upload_bytes + ?"
        " WHERE owner = ?", (nbytes, owner))


async def reserve(conn: aiosqlite.Connection, owner: str, nbytes: int,
                  blobs: int = 0) -> None:
    """Move bytes (and blobs) in (positive) or out (negative) of the owner's
    reservation."""
    await owner_row(conn, owner)
    await conn.execute(
        "UPDATE owners SET reserved_bytes = MAX(0, reserved_bytes + ?),"
        " reserved_blobs = MAX(0, reserved_blobs + ?) WHERE owner = ?",
        (nbytes, blobs, owner))


# -- references --------------------------------------------------------------

async def get_ref(conn: aiosqlite.Connection, owner: str, name: str) -> aiosqlite.Row | None:
    return await _one(conn, "SELECT r.name, r.hash, r.created_at, b.size FROM refs r"
                      " JOIN blobs b ON b.hash = r.hash WHERE r.owner = ? AND r.name = ?",
                      owner, name)


async def add_ref(conn: aiosqlite.Connection, owner: str, name: str, blob: BlobRecord,
                  default: QuotaLimits | None, now: float, *,
                  new_blob: bool = False) -> list[str]:
    """Point ``owner``'s ``name`` at ``blob``; idempotent.

    Returns the digests whose refcount fell to zero because the name was
    re-pointed away from them (the caller deletes or schedules them).
    ``new_blob``: the blob's row was inserted in this transaction, so
    nobody holds it yet. ``default`` None: no limit applies (the owner's
    usage still counts the blob).
    """
    old = await _one(conn, "SELECT hash FROM refs WHERE owner = ? AND name = ?", owner, name)
    if old is not None and old["hash"] == blob.hash:
        return []
    if old is None:
        await _count_new_ref(conn, owner, default)
    zeroed: list[str] = []
    if old is not None:
        # Release first: re-pointing a name frees what it held, so an owner
        # at a limit can still swap one blob for another.
        zeroed = await _release(conn, owner, old["hash"], 1, now)
    await _hold(conn, owner, blob, default, now, new_blob)
    if old is None:
        await conn.execute("INSERT INTO refs (owner, name, hash, created_at)"
                           " VALUES (?, ?, ?, ?)", (owner, name, blob.hash, now))
    else:
        await conn.execute("UPDATE refs SET hash = ?, created_at = ? WHERE owner = ?"
                           " AND name = ?", (blob.hash, now, owner, name))
    await conn.execute("UPDATE blobs SET refcount = refcount + 1, zero_at = NULL"
                       " WHERE hash = ?", (blob.hash,))
    return zeroed


async def _count_new_ref(conn: aiosqlite.Connection, owner: str,
                         default: QuotaLimits | None) -> None:
    """Count one more reference name for ``owner``, refused past max_refs."""
    if default is not None:
        # One statement when the owner exists and has room (nearly always).
        fits = await conn.execute(
            "UPDATE owners SET used_refs = used_refs + 1 WHERE owner = ?"
            " AND used_refs < COALESCE(max_refs, ?)", (owner, default.max_refs))
        if fits.rowcount:
            return
    row = await owner_row(conn, owner)
    if default is not None:
        check_ref_room(row, effective_limits(row, default))
    await conn.execute("UPDATE owners SET used_refs = used_refs + 1 WHERE owner = ?",
                       (owner,))


def check_ref_room(row: aiosqlite.Row, limits: QuotaLimits) -> None:
    """Raise quota_exceeded if the owner of ``row`` may not add a reference
    name; re-pointing a name it has is never refused by this."""
    if row["used_refs"] >= limits.max_refs:
        raise refs_exceeded(limits.max_refs, row["used_refs"])


def refs_exceeded(limit: int, used: int) -> BlobdError:
    return BlobdError("quota_exceeded", f"quota max_refs ({limit}) would be exceeded"
                      f" ({used} references); delete a reference or re-point an"
                      " existing name")


async def has_ref(conn: aiosqlite.Connection, owner: str, name: str) -> bool:
    return await _one(conn, "SELECT 1 FROM refs WHERE owner = ? AND name = ?",
                      owner, name) is not None


async def _hold(conn: aiosqlite.Connection, owner: str, blob: BlobRecord,
                default: QuotaLimits | None, now: float, new_blob: bool = False) -> None:
    if not new_blob:
        held = await conn.execute("UPDATE holdings SET refs = refs + 1 WHERE owner = ?"
                                  " AND hash = ?", (owner, blob.hash))
        if held.rowcount:
            return
    row = await owner_row(conn, owner)
    if default is not None:
        limits = effective_limits(row, default)
        check_blob_size(blob.size, limits, limits.max_blob_size)
        check_room(row, limits, blob.size, 1)
    await conn.execute("INSERT INTO holdings (owner, hash, refs, created_at)"
                       " VALUES (?, ?, 1, ?)", (owner, blob.hash, now))
    await conn.execute("UPDATE owners SET used_bytes = used_bytes + ?,"
                       " used_blobs = used_blobs + 1 WHERE owner = ?", (blob.size, owner))


async def _release(conn: aiosqlite.Connection, owner: str, digest: str, count: int,
                   now: float) -> list[str]:
    await conn.execute("UPDATE holdings SET refs = refs - ? WHERE owner = ? AND hash = ?",
                       (count, owner, digest))
    gone = await conn.execute("DELETE FROM holdings WHERE owner = ? AND hash = ?"
                              " AND refs <= 0", (owner, digest))
    if gone.rowcount:
        await conn.execute(
            "UPDATE owners SET used_bytes = used_bytes - (SELECT size FROM blobs"
            " WHERE hash = ?), used_blobs = used_blobs - 1 WHERE owner = ?",
            (digest, owner))
    await conn.execute("UPDATE blobs SET refcount = refcount - ? WHERE hash = ?",
                       (count, digest))
    row = await _one(conn, "SELECT refcount FROM blobs WHERE hash = ?", digest)
    if row is not None and row["refcount"] <= 0:
        await conn.execute("UPDATE blobs SET refcount = 0, zero_at = ? WHERE hash = ?",
                           (now, digest))
        return [digest]
    return []


async def drop_blob_refs(conn: aiosqlite.Connection, owner: str, digest: str,
                         now: float) -> tuple[int, list[str]]:
    """Drop all of the owner's references to a blob: (dropped, digests at zero)."""
    cur = await conn.execute("DELETE FROM refs WHERE owner = ? AND hash = ?", (owner, digest))
    if not cur.rowcount:
        return 0, []
    await _uncount_refs(conn, owner, cur.rowcount)
    return cur.rowcount, await _release(conn, owner, digest, cur.rowcount, now)


async def repoint_frees(conn: aiosqlite.Connection, owner: str, name: str,
                        digest: str | None) -> tuple[int, int]:
    """(bytes, blobs) that pointing ``owner``'s ``name`` at ``digest`` (None:
    at some blob not known yet) releases before the new blob is held (see
    :func:`add_ref`): the old blob's, when that name was its owner's only
    reference to it."""
    row = await _one(conn, "SELECT b.size FROM refs r JOIN holdings h ON h.owner = r.owner"
                     " AND h.hash = r.hash JOIN blobs b ON b.hash = r.hash"
                     " WHERE r.owner = ? AND r.name = ? AND r.hash IS NOT ? AND h.refs = 1",
                     owner, name, digest)
    return (row["size"], 1) if row is not None else (0, 0)


async def may_repoint_by_hash(conn: aiosqlite.Connection, owner: str) -> bool:
    """Whether ``owner`` has a reference named like a BLAKE3 digest and
    pointing at another blob, the only reference to it: what a blob known
    only by its SHA-256, named by its BLAKE3 digest, may re-point and free."""
    return await _one(conn, "SELECT 1 FROM refs r JOIN holdings h ON h.owner = r.owner"
                      " AND h.hash = r.hash WHERE r.owner = ? AND h.refs = 1"
                      " AND r.name != r.hash AND length(r.name) = 64"
                      " AND r.name NOT GLOB '*[^0-9a-f]*' LIMIT 1", owner) is not None


async def holds(conn: aiosqlite.Connection, owner: str, digest: str) -> bool:
    """Whether the owner holds at least one reference to a blob."""
    return await _one(conn, "SELECT 1 FROM refs WHERE owner = ? AND hash = ? LIMIT 1",
                      owner, digest) is not None


async def refs_to(conn: aiosqlite.Connection, digest: str) -> list[tuple[str, str]]:
    """(owner, name) of every reference to a blob, over all owners."""
    rows = await _all(conn, "SELECT owner, name FROM refs WHERE hash = ?", digest)
    return [(r["owner"], r["name"]) for r in rows]


async def drop_ref(conn: aiosqlite.Connection, owner: str, name: str,
                   now: float) -> list[str] | None:
    """Drop one named reference; None when it does not exist."""
    row = await _one(conn, "SELECT hash FROM refs WHERE owner = ? AND name = ?", owner, name)
    if row is None:
        return None
    await conn.execute("DELETE FROM refs WHERE owner = ? AND name = ?", (owner, name))
    await _uncount_refs(conn, owner, 1)
    return await _release(conn, owner, row["hash"], 1, now)


async def _uncount_refs(conn: aiosqlite.Connection, owner: str, count: int) -> None:
    await conn.execute("UPDATE owners SET used_refs = used_refs - ? WHERE owner = ?",
                       (count, owner))


async def list_holdings(conn: aiosqlite.Connection, owner: str, limit: int,
                        after: int | None) -> list[aiosqlite.Row]:
    return await _all(
        conn, "SELECT h.id, h.hash, h.created_at, b.size, b.content_type, b.audio"
        " FROM holdings h"
        " JOIN blobs b ON b.hash = h.hash WHERE h.owner = ? AND h.id < ?"
        " ORDER BY h.id DESC LIMIT ?", owner, after if after is not None else 1 << 62, limit)


async def list_refs(conn: aiosqlite.Connection, owner: str, prefix: str, limit: int,
                    after: str | None) -> list[aiosqlite.Row]:
    # Names use only [A-Za-z0-9._:@-], so prefix || char(0x7f) bounds the range.
    return await _all(
        conn, "SELECT r.name, r.hash, r.created_at, b.size FROM refs r"
        " JOIN blobs b ON b.hash = r.hash WHERE r.owner = ? AND r.name >= ?"
        " AND r.name < ? AND r.name > ? ORDER BY r.name LIMIT ?",
        owner, prefix, prefix + "\x7f", after or "", limit)


# -- counters ----------------------------------------------------------------

async def bump(conn: aiosqlite.Connection, **deltas: int) -> None:
    for name, delta in deltas.items():
        if delta:
            await conn.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name)"
                " DO UPDATE SET value = value + excluded.value", (name, delta))


async def counters(conn: aiosqlite.Connection) -> dict[str, int]:
    return {r["name"]: r["value"] for r in await _all(conn, "SELECT * FROM counters")}


# -- mirror outbox -----------------------------------------------------------

async def enqueue_mirror(conn: aiosqlite.Connection, digest: str, op: str,
                         now: float) -> None:
    """Queue a mirror upload or deletion in the caller's transaction."""
    await conn.execute("INSERT INTO mirror_queue (hash, op, enqueued_at, next_at)"
                       " VALUES (?, ?, ?, ?)", (digest, op, now, now))
