"""The index against itself: counts that :mod:`blobd.index` keeps in step
with the ``refs`` rows, recounted from those rows.

* ``refcount``: ``blobs.refcount`` against the references naming the blob,
  and ``zero_at`` set exactly when nothing does;
* ``holdings``: one row per (owner, blob) with the owner's reference count;
* ``usage``: ``owners.used_bytes`` / ``used_blobs`` against the distinct
  blobs each owner references, and ``used_refs`` against its references;
* ``reserved``: ``owners.reserved_bytes`` and ``reserved_blobs`` against
  what the owner's open upload sessions reserve.

Each check is one SQL statement, so it sees one snapshot even while a
server writes. Repairs make the counts match the references, which are the
truth: nothing a client stored is dropped.
"""

from __future__ import annotations

import time

import aiosqlite

from .. import index
from .report import Problem

_REFCOUNT_SQL = """
SELECT b.hash, b.refcount, b.zero_at, coalesce(r.n, 0) AS actual
FROM blobs b LEFT JOIN (SELECT hash, count(*) AS n FROM refs GROUP BY hash) r
  ON r.hash = b.hash
WHERE b.refcount != coalesce(r.n, 0)
   OR (coalesce(r.n, 0) > 0 AND b.zero_at IS NOT NULL)
   OR (coalesce(r.n, 0) = 0 AND b.zero_at IS NULL)
"""

# Holdings that differ from, or are absent from, the references; then
# holdings no reference explains. One statement: one snapshot.
_HOLDINGS_SQL = """
SELECT e.owner, e.hash, e.n AS actual, h.refs AS recorded
FROM (SELECT owner, hash, count(*) AS n FROM refs GROUP BY owner, hash) e
  LEFT JOIN holdings h ON h.owner = e.owner AND h.hash = e.hash
WHERE h.refs IS NULL OR h.refs != e.n
UNION ALL
SELECT h.owner, h.hash, 0, h.refs FROM holdings h
WHERE NOT EXISTS (SELECT 1 FROM refs r WHERE r.owner = h.owner AND r.hash = h.hash)
"""

_USAGE_SQL = """
WITH named AS (SELECT owner, hash, count(*) AS refs FROM refs GROUP BY owner, hash),
     held AS (SELECT h.owner, sum(b.size) AS bytes, count(*) AS n, sum(h.refs) AS refs
              FROM named h JOIN blobs b ON b.hash = h.hash GROUP BY h.owner)
SELECT o.owner, o.used_bytes, o.used_blobs, o.used_refs,
       coalesce(held.bytes, 0) AS bytes, coalesce(held.n, 0) AS n,
       coalesce(held.refs, 0) AS refs
FROM owners o LEFT JOIN held ON held.owner = o.owner
WHERE o.used_bytes != coalesce(held.bytes, 0) OR o.used_blobs != coalesce(held.n, 0)
   OR o.used_refs != coalesce(held.refs, 0)
UNION ALL
SELECT held.owner, 0, 0, 0, held.bytes, held.n, held.refs FROM held
WHERE held.owner NOT IN (SELECT owner FROM owners)
"""


_RESERVED_SQL = """
WITH open AS (SELECT owner, sum(reserved_bytes) AS bytes,
                     sum(result_hash IS NULL) AS n FROM uploads GROUP BY owner)
SELECT o.owner, o.reserved_bytes, o.reserved_blobs, coalesce(open.bytes, 0) AS bytes,
       coalesce(open.n, 0) AS n
FROM owners o LEFT JOIN open ON open.owner = o.owner
WHERE o.reserved_bytes != coalesce(open.bytes, 0) OR o.reserved_blobs != coalesce(open.n, 0)
UNION ALL
SELECT open.owner, 0, 0, open.bytes, open.n FROM open
WHERE (open.bytes != 0 OR open.n != 0) AND open.owner NOT IN (SELECT owner FROM owners)
"""


async def _rows(conn: aiosqlite.Connection, sql: str) -> list[aiosqlite.Row]:
    async with conn.execute(sql) as cur:
        return list(await cur.fetchall())


async def find(conn: aiosqlite.Connection) -> list[Problem]:
    problems = []
    for row in await _rows(conn, _REFCOUNT_SQL):
        state = "" if (row["actual"] > 0) == (row["zero_at"] is None) else (
            ", marked unreferenced" if row["zero_at"] is not None
            else ", not marked unreferenced")
        problems.append(Problem("refcount", row["hash"],
                                f"refcount {row['refcount']}, {row['actual']} references"
                                f"{state}"))
    for row in await _rows(conn, _HOLDINGS_SQL):
        problems.append(Problem("holdings", f"{row['owner']}/{row['hash']}",
                                f"holding says {row['recorded']} references,"
                                f" {row['actual']} exist"))
    problems += await find_usage(conn)
    return problems


async def find_usage(conn: aiosqlite.Connection) -> list[Problem]:
    return [Problem("usage", row["owner"],
                    f"usage {row['used_bytes']} bytes / {row['used_blobs']} blobs /"
                    f" {row['used_refs']} references, references hold {row['bytes']}"
                    f" bytes / {row['n']} blobs / {row['refs']} references")
            for row in await _rows(conn, _USAGE_SQL)] + [
        Problem("reserved", row["owner"],
                f"{row['reserved_bytes']} bytes / {row['reserved_blobs']} blobs reserved,"
                f" open upload sessions reserve {row['bytes']} / {row['n']}")
        for row in await _rows(conn, _RESERVED_SQL)]


async def repair(conn: aiosqlite.Connection) -> int:
    """Recount everything from the references, inside the caller's write
    transaction; returns how many rows changed."""
    now = time.time()
    changed = 0
    for row in await _rows(conn, _REFCOUNT_SQL):
        await conn.execute(
            "UPDATE blobs SET refcount = ?, zero_at = CASE WHEN ? > 0 THEN NULL"
            " ELSE coalesce(zero_at, ?) END WHERE hash = ?",
            (row["actual"], row["actual"], now, row["hash"]))
        changed += 1
    for row in await _rows(conn, _HOLDINGS_SQL):
        changed += await _repair_holding(conn, row)
    for row in await _rows(conn, _USAGE_SQL):
        await index.owner_row(conn, row["owner"])
        await conn.execute("UPDATE owners SET used_bytes = ?, used_blobs = ?, used_refs = ?"
                           " WHERE owner = ?", (row["bytes"], row["n"], row["refs"],
                                                row["owner"]))
        changed += 1
    for row in await _rows(conn, _RESERVED_SQL):
        await index.owner_row(conn, row["owner"])
        await conn.execute("UPDATE owners SET reserved_bytes = ?, reserved_blobs = ?"
                           " WHERE owner = ?", (row["bytes"], row["n"], row["owner"]))
        changed += 1
    return changed


async def _repair_holding(conn: aiosqlite.Connection, row: aiosqlite.Row) -> int:
    owner, digest, actual = row["owner"], row["hash"], row["actual"]
    if actual == 0:
        await conn.execute("DELETE FROM holdings WHERE owner = ? AND hash = ?", (owner, digest))
    elif row["recorded"] is None:
        await conn.execute(
            "INSERT INTO holdings (owner, hash, refs, created_at) SELECT ?, ?, ?,"
            " min(created_at) FROM refs WHERE owner = ? AND hash = ?",
            (owner, digest, actual, owner, digest))
    else:
        await conn.execute("UPDATE holdings SET refs = ? WHERE owner = ? AND hash = ?",
                           (actual, owner, digest))
    return 1
