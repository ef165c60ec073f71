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

# Shards read from disk ahead of the one being compared (see check_tree).
SCAN_AHEAD = 1
# Batches hashed at once by --verify: enough to keep a disk queue busy.
VERIFY_THREADS = 4
# A batch is one thread call: many small files, or one big one.
VERIFY_BATCH_FILES = 256
VERIFY_BATCH_BYTES = 64 << 20
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


def _misfits(scan: Scan, found: tree.ShardScan) -> None:
    """Report the entries that are no blob file in its place."""
    for path, why in found.strays:
        scan.report.problems.append(scan.suspect("stray", str(path), why, Evidence(path=path)))
    for path, digest in found.misplaced:
        scan.report.problems.append(scan.suspect(
            "misplaced", str(path), f"belongs under {digest[:2]}/{digest[2:4]}/",
            Evidence(path=path)))


async def check_tree(scan: Scan) -> None:
    blobs_dir = scan.store.layout.blobs_dir
    try:
        top = await asyncio.to_thread(tree.scan_top, blobs_dir)
    except OSError as exc:
        # Every shard is beneath it: there is nothing to compare.
        scan.report.problems.append(Problem("unreadable", str(blobs_dir),
                                            tree.why_unreadable(blobs_dir, exc)))
        return
    _misfits(scan, top)
    # Directory reads wait on the disk: the next shard is read in a thread
    # while this one is compared with the index. (Reading more shards at
    # once measured slower: they contend for the same directory locks.)
    ahead: list[asyncio.Future[tree.ShardScan]] = []
    for prefix in tree.PREFIXES[:SCAN_AHEAD]:
        ahead.append(asyncio.ensure_future(
            asyncio.to_thread(tree.scan_shard, blobs_dir, prefix)))
    try:
        for i, prefix in enumerate(tree.PREFIXES):
            found = await ahead[i]
            if i + SCAN_AHEAD < len(tree.PREFIXES):
                ahead.append(asyncio.ensure_future(asyncio.to_thread(
                    tree.scan_shard, blobs_dir, tree.PREFIXES[i + SCAN_AHEAD])))
            await check_shard(scan, prefix, found)
    finally:
        pending = [f for f in ahead if not f.done()]
        if pending:
            await asyncio.wait(pending)


async def _rows(conn: aiosqlite.Connection, prefix: str) -> list[aiosqlite.Row]:
    upper = prefix[0] + chr(ord(prefix[1]) + 1)  # "a9" -> "a:" sorts after "a9…"
    async with conn.execute("SELECT hash, size, sha256, refcount FROM blobs"
                            " WHERE hash >= ? AND hash < ?", (prefix, upper)) as cur:
        return list(await cur.fetchall())


async def check_shard(scan: Scan, prefix: str, found: tree.ShardScan) -> None:
    unknown = tuple(found.unknown)
    rows = [row for row in await _rows(scan.store.db.reader, prefix)
            if not row["hash"].startswith(unknown)]
    found.files = {d: info for d, info in found.files.items() if not d.startswith(unknown)}
    for path, why in found.unreadable:
        scan.report.problems.append(Problem("unreadable", str(path), why))
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
    _misfits(scan, found)
    if scan.verify:
        suspects += await _verify(scan, to_verify)
    else:
        scan.advance(len(rows))
    scan.report.problems += await confirm(scan, suspects)


async def _verify(scan: Scan, rows: list[aiosqlite.Row]) -> list[Problem]:
    """Re-hash the files of ``rows``: batches of small files per thread call
    (a hop per file would cost more than hashing it), a few batches at once."""
    gate = asyncio.Semaphore(VERIFY_THREADS)
    layout = scan.store.layout

    async def batch(part: list[aiosqlite.Row]) -> list[Problem]:
        paths = [layout.blob_path(row["hash"]) for row in part]
        async with gate:
            hashed = await asyncio.to_thread(tree.hash_blobs, paths)
        scan.advance(sum(row["size"] for row in part))
        return [p for row, h in zip(part, hashed) if (p := _judge(scan, row, h))]

    results = await asyncio.gather(*(batch(part) for part in _batches(rows)))
    return [problem for part in results for problem in part]


def _batches(rows: list[aiosqlite.Row]) -> list[list[aiosqlite.Row]]:
    parts: list[list[aiosqlite.Row]] = [[]]
    size = 0
    for row in rows:
        if parts[-1] and (len(parts[-1]) >= VERIFY_BATCH_FILES
                          or size + row["size"] > VERIFY_BATCH_BYTES):
            parts.append([])
            size = 0
        parts[-1].append(row)
        size += row["size"]
    return [part for part in parts if part]


def _judge(scan: Scan, row: aiosqlite.Row,
           hashed: tuple[Digests, FileInfo] | tree.Unreadable | None) -> Problem | None:
    if hashed is None:
        return scan.suspect("missing", row["hash"], "no file", Evidence())
    if isinstance(hashed, tree.Unreadable):
        # Not a suspect to confirm: no commit in flight makes a file unreadable.
        path = scan.store.layout.blob_path(row["hash"])
        scan.report.problems.append(Problem("unreadable", str(path), hashed.why))
        return None
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
