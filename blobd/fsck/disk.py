"""The blob tree against the index, one top-level shard at a time.

Each shard is scanned in one thread call and compared with the index rows
whose digest starts with its two hex digits (one range query), so memory
and batch size stay at 1/256 of the store.

A running server adds and removes blobs while we look. It only ever links
a blob into place or moves one out *inside* a write transaction, so every
discrepancy is confirmed again while fsck holds the SQLite write lock (a
transaction that writes nothing): what is still wrong then is damage, not
a commit in flight.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiosqlite

from .. import index
from ..files import Digests
from ..store import Store
from . import tree
from .report import Problem, Report
from .tree import FileInfo

# Files hashed at once by --verify: enough to keep a disk queue busy.
VERIFY_THREADS = 4
# Suspects confirmed per write transaction, so a server waits only briefly.
CONFIRM_BATCH = 256


@dataclass
class Evidence:
    """What a suspect was judged on, to judge it again under the lock."""
    file: FileInfo | None = None
    digests: Digests | None = None
    path: Path | None = None


@dataclass
class Scan:
    store: Store
    report: Report
    verify: bool
    advance: Callable[[int], None]

    @staticmethod
    def suspect(kind: str, subject: str, detail: str, evidence: Evidence) -> Problem:
        return Problem(kind, subject, detail, evidence=evidence)


async def check_tree(scan: Scan) -> None:
    blobs_dir = scan.store.layout.blobs_dir
    for path, why in await asyncio.to_thread(tree.scan_top, blobs_dir):
        scan.report.problems.append(scan.suspect("stray", str(path), why, Evidence(path=path)))
    for prefix in tree.PREFIXES:
        await check_shard(scan, prefix)


async def _rows(conn: aiosqlite.Connection, prefix: str) -> list[aiosqlite.Row]:
    upper = prefix[0] + chr(ord(prefix[1]) + 1)  # "a9" -> "a:" sorts after "a9…"
    async with conn.execute("SELECT hash, size, sha256, refcount FROM blobs"
                            " WHERE hash >= ? AND hash < ?", (prefix, upper)) as cur:
        return list(await cur.fetchall())


async def check_shard(scan: Scan, prefix: str) -> None:
    found = await asyncio.to_thread(tree.scan_shard, scan.store.layout.blobs_dir, prefix)
    rows = await _rows(scan.store.db.reader, prefix)
    scan.report.blobs += len(rows)
    scan.report.files += len(found.files)
    suspects: list[Problem] = []
    to_verify = []
    for row in rows:
        info = found.files.pop(row["hash"], None)
        if info is None:
            suspects.append(scan.suspect("missing", row["hash"], "no file", Evidence()))
        elif info.size != row["size"]:
            suspects.append(scan.suspect(
                "size", row["hash"], f"file has {info.size} bytes, index {row['size']}",
                Evidence(file=info)))
        elif scan.verify:
            to_verify.append(row)
    for digest, info in found.files.items():
        suspects.append(scan.suspect("orphan", digest, f"{info.size} bytes, no index row",
                                     Evidence(file=info)))
    for path, why in found.strays:
        scan.report.problems.append(scan.suspect("stray", str(path), why, Evidence(path=path)))
    for path, digest in found.misplaced:
        scan.report.problems.append(scan.suspect(
            "misplaced", str(path), f"belongs under {digest[:2]}/{digest[2:4]}/",
            Evidence(path=path)))
    if scan.verify:
        suspects += await _verify(scan, to_verify)
    else:
        scan.advance(len(rows))
    scan.report.problems += await confirm(scan, suspects)


async def _verify(scan: Scan, rows: list[aiosqlite.Row]) -> list[Problem]:
    gate = asyncio.Semaphore(VERIFY_THREADS)
    layout = scan.store.layout

    async def one(row: aiosqlite.Row) -> Problem | None:
        async with gate:
            hashed = await asyncio.to_thread(tree.hash_blob, layout.blob_path(row["hash"]))
        scan.advance(row["size"])
        if hashed is None:
            return scan.suspect("missing", row["hash"], "no file", Evidence())
        digests, info = hashed
        scan.report.bytes_verified += digests.size
        if digests.blake3 != row["hash"]:
            return scan.suspect("corrupt", row["hash"], f"content hashes to {digests.blake3}",
                                Evidence(file=info, digests=digests))
        if digests.sha256 != row["sha256"]:
            return scan.suspect("sha256", row["hash"],
                                f"index has {row['sha256']}, content {digests.sha256}",
                                Evidence(file=info, digests=digests))
        return None

    results = await asyncio.gather(*(one(row) for row in rows))
    return [p for p in results if p is not None]


async def confirm(scan: Scan, suspects: list[Problem]) -> list[Problem]:
    """Keep the suspects that are still wrong while no transaction can
    place or remove a blob file."""
    kept: list[Problem] = []
    for start in range(0, len(suspects), CONFIRM_BATCH):
        async with scan.store.write() as tx:
            for problem in suspects[start:start + CONFIRM_BATCH]:
                if await _still_wrong(scan, tx.conn, problem):
                    kept.append(problem)
    return kept


async def _still_wrong(scan: Scan, conn: aiosqlite.Connection, problem: Problem) -> bool:
    blob = await index.get_blob(conn, problem.subject)
    now = await asyncio.to_thread(tree.stat_file, scan.store.layout.blob_path(problem.subject))
    seen: Evidence = problem.evidence
    if problem.kind == "missing":
        return blob is not None and now is None
    if problem.kind == "orphan":
        return blob is None and now is not None
    if blob is None or now is None:
        return False
    if problem.kind == "size":
        return now.size != blob.size
    # corrupt / sha256: blob files never change in place, so the same file
    # (same inode) still there means the content we hashed is what is stored.
    same_file = seen.file is not None and (now.dev, now.ino) == (seen.file.dev, seen.file.ino)
    if problem.kind == "sha256":
        return same_file and seen.digests is not None and seen.digests.sha256 != blob.sha256
    return same_file
