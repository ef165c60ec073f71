"""Fill blobd's SQLite index with synthetic blob rows, for the index-scale workload.

Integration point
-----------------
`populate_index(data_dir, n)` is the one function the index-scale workload
calls, on a data dir that a stopped blobd has already initialised (schema
created). It must add n blob rows, durable and committed, and return n.

This generic version knows nothing of blobd's code: it finds the SQLite file
in data_dir, reads the `blobs` table's columns, and inserts all rows with one
`executemany` in one transaction. A schema it cannot fill (no hash column, or
a NOT NULL column without a default that it does not recognise) raises
`SchemaMismatch` naming the columns, so a schema change breaks the benchmark
loudly rather than measuring something else.

It stays generic on purpose rather than going through `blobd.index`: a
million rows go in with one `executemany` in seconds, and the benchmark
measures a schema it reads, not one it assumes. Should a version ever
import blobd's own modules, let an ImportError propagate: the workload
reports "not available" on ImportError and on nothing else.

Synthetic rows have no files on disk: the workload only reads blobs it
uploads over HTTP afterwards. Each row gets refcount 1 when that column
exists, so no start-up garbage collection can take them for orphans.
"""

from __future__ import annotations

import os
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

SQLITE_MAGIC = b"SQLite format 3\x00"
SYNTHETIC_SIZE = 65536


class SchemaMismatch(RuntimeError):
    """The index does not look like what this populator knows how to fill."""


def populate_index(data_dir: Path, n: int) -> int:
    """Insert n synthetic blobs into the index under data_dir; return n."""
    db_path = find_index_db(Path(data_dir))
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        # A bulk load into a stopped server's index: no durability needed,
        # and random keys into B-trees want every page in memory (1 GiB).
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -1048576")
        columns, fillers = plan_columns(table_columns(conn, "blobs"))
        sql = f"INSERT INTO blobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, synthetic_rows(fillers, n))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return n


def find_index_db(data_dir: Path) -> Path:
    """The one SQLite file under data_dir (two levels deep) that has a `blobs` table."""
    found = []
    for path in [*data_dir.glob("*"), *data_dir.glob("*/*")]:
        if path.is_file() and _is_sqlite(path) and _has_table(path, "blobs"):
            found.append(path)
    if len(found) != 1:
        raise SchemaMismatch(f"expected one SQLite file with a `blobs` table under {data_dir}, found {found}")
    return found[0]


def table_columns(conn: sqlite3.Connection, table: str) -> list[dict]:
    rows = conn.execute(f"PRAGMA table_info({table})").fetchall()
    if not rows:
        raise SchemaMismatch(f"no table {table!r} in the index")
    return [{"name": r[1], "type": (r[2] or "").upper(), "notnull": bool(r[3]),
             "default": r[4], "pk": r[5]} for r in rows]


# Column names this populator can fill, by the value's meaning.
HASH_NAMES = {"hash", "blake3", "digest", "address", "blake3_hash"}
SHA256_NAMES = {"sha256", "sha256_hash", "sha256_hex"}
SIZE_NAMES = {"size", "size_bytes", "length", "byte_size"}
TYPE_NAMES = {"content_type", "mime_type", "media_type"}
TIME_NAMES = {"created_at", "stored_at", "committed_at", "updated_at", "last_access_at"}
REFCOUNT_NAMES = {"refcount", "ref_count", "refs", "references_count"}


def plan_columns(columns: list[dict]) -> tuple[list[str], list[Callable[[int, bytes], object]]]:
    """Pick the columns to set and how to fill each; fail on anything unfillable."""
    names, fillers, unknown = [], [], []
    for col in columns:
        filler = _filler_for(col)
        if filler is not None:
            names.append(col["name"])
            fillers.append(filler)
        elif col["notnull"] and col["default"] is None and not _is_rowid(col):
            unknown.append(col["name"])
    if not any(n.lower() in HASH_NAMES for n in names):
        raise SchemaMismatch(f"`blobs` has no hash column I know ({sorted(HASH_NAMES)}); columns: "
                             f"{[c['name'] for c in columns]}")
    if unknown:
        raise SchemaMismatch(f"`blobs` has NOT NULL columns without default that I cannot fill: {unknown}; "
                             f"update bench/populate.py")
    return names, fillers


def synthetic_rows(fillers: list[Callable[[int, bytes], object]], n: int) -> Iterator[tuple]:
    """n rows with random 32-byte digests (64 bytes of randomness per row)."""
    chunk = 10_000
    for base in range(0, n, chunk):
        count = min(chunk, n - base)
        entropy = os.urandom(64 * count)
        for j in range(count):
            rand = entropy[64 * j: 64 * j + 64]
            yield tuple(f(base + j, rand) for f in fillers)


def _filler_for(col: dict) -> Callable[[int, bytes], object] | None:
    name, ctype = col["name"].lower(), col["type"]
    as_bytes = "BLOB" in ctype
    if name in HASH_NAMES:
        return (lambda i, r: r[:32]) if as_bytes else (lambda i, r: r[:32].hex())
    if name in SHA256_NAMES:
        return (lambda i, r: r[32:]) if as_bytes else (lambda i, r: r[32:].hex())
    if name in SIZE_NAMES:
        return lambda i, r: SYNTHETIC_SIZE
    if name in TYPE_NAMES:
        return lambda i, r: "application/octet-stream"
    if name in REFCOUNT_NAMES:
        return lambda i, r: 1
    if name in TIME_NAMES:
        return _time_filler(ctype)
    return None


def _time_filler(ctype: str) -> Callable[[int, bytes], object]:
    now = time.time()
    if "INT" in ctype:
        return lambda i, r: int(now)
    if any(t in ctype for t in ("REAL", "FLOA", "DOUB")):
        return lambda i, r: now
    stamp = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return lambda i, r: stamp


def _is_rowid(col: dict) -> bool:
    return col["pk"] == 1 and col["type"] == "INTEGER"


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def _has_table(path: Path, table: str) -> bool:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                                (table,)).fetchone() is not None
        finally:
            conn.close()
    except sqlite3.Error:
        return False
