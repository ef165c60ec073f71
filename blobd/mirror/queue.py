"""The mirror outbox, table ``mirror_queue``: what is due, done and failing.

A row is one operation, ``put`` or ``delete``, on one blob's object. It is
written in the same transaction as the change it mirrors
(:meth:`blobd.store.Tx.enqueue_mirror`), so nothing the index records can be
missing from the queue, whatever crashes when. A row stays until its
operation succeeds or becomes moot; a failure keeps it, with ``attempts``
counted, ``last_error`` kept and ``next_at`` pushed back.

Operations on one hash run one at a time, in the order they were queued: a
row is due only when no older row for its hash is left. So a ``delete``
never overtakes the ``put`` before it, and the ``put`` of content stored
again after a deletion lands after that deletion.

``GET /stats`` reads the same table: ``pending`` is every row, ``failed``
the rows that have failed at least once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Collection

import aiosqlite

# Seconds before the first retry; each failure doubles it, up to the cap.
FIRST_RETRY_SECONDS = 1.0
# After this many failures in a row a blob's mirror state reads "failed"
# (a refused upload says so at once). The row is retried all the same.
FAILED_AFTER_ATTEMPTS = 5
ERROR_MAX_CHARS = 500

_OLDEST_FOR_ITS_HASH = ("NOT EXISTS (SELECT 1 FROM mirror_queue o"
                        " WHERE o.hash = q.hash AND o.id < q.id)")


@dataclass(frozen=True)
class Job:
    id: int
    hash: str
    op: str  # "put" or "delete"
    attempts: int


def _not_busy(busy: Collection[str]) -> tuple[str, list[str]]:
    if not busy:
        return "", []
    return f" AND q.hash NOT IN ({','.join('?' * len(busy))})", list(busy)


async def due(conn: aiosqlite.Connection, now: float, limit: int,
              busy: Collection[str] = ()) -> list[Job]:
    """Up to ``limit`` operations to run now, oldest first, none for a hash
    in ``busy`` (operations already running)."""
    clause, params = _not_busy(busy)
    sql = (f"SELECT id, hash, op, attempts FROM mirror_queue q WHERE next_at <= ?"
           f" AND {_OLDEST_FOR_ITS_HASH}{clause} ORDER BY next_at, id LIMIT ?")
    async with conn.execute(sql, (now, *params, limit)) as cur:
        rows = await cur.fetchall()
    return [Job(r["id"], r["hash"], r["op"], r["attempts"]) for r in rows]


async def next_due_at(conn: aiosqlite.Connection,
                      busy: Collection[str] = ()) -> float | None:
    """When the next operation that could start becomes due; None if none."""
    clause, params = _not_busy(busy)
    sql = (f"SELECT min(next_at) FROM mirror_queue q WHERE {_OLDEST_FOR_ITS_HASH}"
           f"{clause}")
    async with conn.execute(sql, params) as cur:
        row = await cur.fetchone()
    return row[0] if row is not None else None


async def finish(conn: aiosqlite.Connection, job: Job) -> None:
    """The operation succeeded, or there is nothing left for it to do."""
    await conn.execute("DELETE FROM mirror_queue WHERE id = ?", (job.id,))
    if job.op == "put":
        await conn.execute("UPDATE blobs SET mirror_state = 'done' WHERE hash = ?",
                           (job.hash,))


async def fail(conn: aiosqlite.Connection, job: Job, error: str, now: float,
               cap: float, permanent: bool = False) -> float:
    """Record a failure and schedule the retry; returns the delay chosen.

    ``permanent``: the same request will fail again until someone acts (a
    refused upload, a missing local file). Retried all the same, capped, so
    a fix is noticed without a restart."""
    attempts = job.attempts + 1
    delay = backoff(attempts, cap)
    await conn.execute("UPDATE mirror_queue SET attempts = ?, next_at = ?, last_error = ?"
                       " WHERE id = ?", (attempts, now + delay, error[:ERROR_MAX_CHARS],
                                         job.id))
    if job.op == "put" and (permanent or attempts >= FAILED_AFTER_ATTEMPTS):
        await conn.execute("UPDATE blobs SET mirror_state = 'failed' WHERE hash = ?",
                           (job.hash,))
    return delay


def backoff(attempts: int, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": half the delay is fixed, the
    other half random, so retries of many operations that failed together
    (a mirror that went down) spread out instead of arriving in waves."""
    delay = min(cap, FIRST_RETRY_SECONDS * 2 ** min(attempts - 1, 32))
    return delay / 2 + (rng or random).uniform(0, delay / 2)


async def retry_now(conn: aiosqlite.Connection, now: float) -> int:
    """Make every waiting operation due now: at start-up, and when the
    mirror answers again after failures, so a backlog drains at once rather
    than at each row's backoff."""
    cur = await conn.execute("UPDATE mirror_queue SET next_at = ? WHERE next_at > ?",
                             (now, now))
    return cur.rowcount


async def enqueue_unmirrored(conn: aiosqlite.Connection, now: float) -> int:
    """Queue a put for every blob stored while no mirror was configured."""
    await conn.execute("INSERT INTO mirror_queue (hash, op, enqueued_at, next_at)"
                       " SELECT hash, 'put', ?, ? FROM blobs WHERE mirror_state = 'off'",
                       (now, now))
    cur = await conn.execute("UPDATE blobs SET mirror_state = 'pending'"
                             " WHERE mirror_state = 'off'")
    return cur.rowcount


@dataclass(frozen=True)
class Position:
    """Where the queue stood when a sync began: its newest row, and the
    blobs with a deletion queued up to it."""
    last_id: int
    deleting: frozenset[str]


async def position(conn: aiosqlite.Connection) -> Position:
    """The queue's position now. Ids only grow (AUTOINCREMENT) and a row
    committed later gets a larger one, so every row up to ``last_id`` is
    committed by the time this reads them."""
    async with conn.execute("SELECT coalesce(max(id), 0) FROM mirror_queue") as cur:
        (last,) = await cur.fetchone()
    async with conn.execute("SELECT DISTINCT hash FROM mirror_queue WHERE op = 'delete'"
                            " AND id <= ?", (last,)) as cur:
        deleting = frozenset(row[0] for row in await cur.fetchall())
    return Position(last, deleting)


async def mark_mirrored(conn: aiosqlite.Connection, digests: Collection[str],
                        since: Position) -> None:
    """These blobs were in the bucket (sync found or put them there) after
    the queue stood at ``since``: their puts up to it have nothing left to
    do. A later put (the blob deleted and stored again meanwhile, its object
    perhaps deleted) stays, and so does its state; deletions stay.

    A blob with a deletion queued at ``since`` is left to the worker: that
    deletion may be under way (checked the index, not yet deleted) and
    remove the object the bucket listing showed, so the put behind it must
    still run. A blob is marked done only once no row is left for it."""
    digests = [digest for digest in digests if digest not in since.deleting]
    if not digests:
        return
    marks = ",".join("?" * len(digests))
    await conn.execute(f"DELETE FROM mirror_queue WHERE op = 'put' AND id <= ?"
                       f" AND hash IN ({marks})", (since.last_id, *digests))
    await conn.execute(f"UPDATE blobs SET mirror_state = 'done' WHERE hash IN ({marks})"
                       " AND mirror_state != 'done' AND NOT EXISTS (SELECT 1 FROM"
                       " mirror_queue q WHERE q.hash = blobs.hash)", tuple(digests))


async def counts(conn: aiosqlite.Connection) -> dict[str, Any]:
    """Queue depth, operations failing, the latest failure's error, and
    when the oldest operation was queued (None with none; the first row by
    id, as ids grow in commit order)."""
    async with conn.execute(
            "SELECT count(*), coalesce(sum(attempts > 0), 0) FROM mirror_queue") as cur:
        pending, failed = await cur.fetchone()
    async with conn.execute("SELECT last_error FROM mirror_queue WHERE last_error"
                            " IS NOT NULL ORDER BY next_at DESC, id DESC LIMIT 1") as cur:
        row = await cur.fetchone()
    last_error = row[0] if row is not None else None
    async with conn.execute("SELECT enqueued_at FROM mirror_queue ORDER BY id LIMIT 1") as cur:
        row = await cur.fetchone()
    return {"pending": pending, "failed": failed, "last_error": last_error,
            "oldest_enqueued_at": row[0] if row is not None else None}
